"""The embedded end-to-end demo (the README's main command): synthetic ego-exo data -> all stages -> evaluation.

  python launch/demo.py [--workdir /tmp/exo2ego_demo] [--seed 0] [--scale 1.0]

1. Generates the synthetic ego-exo dataset (rendered takes in the Ego-Exo4D format, EgoIT conversations,
   held-out multiple-choice items) and builds its records with the real builders.
2. Trains a Mistral-style BPE tokenizer on the synthetic text.
3. Runs the init stage and stages 1-3 with `launch/stageN.py --config configs/stageN.py:demo` (the code users
   run on GPU pods), each from the previous stage's export; and the single-encoder VideoLLaMA2 baseline: the
   same init stage, then stage-3 instruction tuning on the ego encoder alone (no exo stages, no F).
4. Scores the held-out multiple-choice clips for both models (option log-likelihood and generated letters),
   answers one question about a generated clip, and writes WORKDIR/results.md and loss-curve PNGs.
Deterministic from --seed. `--scale` multiplies the step counts (0.25 for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launch"))

import chain
from exo2ego_jax.data import synthetic, template
from exo2ego_jax.data.builders import format_summary
from exo2ego_jax.data.tokenizer import train_tokenizer
from exo2ego_jax.eval.runner import EvalSettings, run_benchmark
from exo2ego_jax.serve.inference import answer_question, load_model

# Optimizer steps per stage at --scale 1 (batch 8, CPU): the init stage also teaches the tiny LLM the
# narration language (it stands in for VideoLLaMA2's pretraining, see configs/stage0.py).
STEPS = {"stage0": 240, "stage1": 60, "stage2": 80, "stage3": 320}
BASELINE_TRAINABLE = (r"llm/.*/lora_[ab]", r"ego_encoder/.*", r"connector/.*")


def losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def plot_losses(runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.8))
    for ax, (name, curve) in zip(axes, runs.items()):
        steps, values = zip(*curve)
        ax.plot(steps, values, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/exo2ego_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--workers", type=int, default=0, help="decoding processes for the record build")
    a = p.parse_args(argv)
    started = time.time()
    work = os.path.abspath(a.workdir)
    data = os.path.join(work, "data")
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)

    print(f"[1/5] synthetic ego-exo dataset (seed {a.seed}) -> {data}", flush=True)
    for summary in synthetic.build(data, seed=a.seed, preset="demo", workers=a.workers):
        print(format_summary(summary), flush=True)
    raw = os.path.join(data, "raw")
    print("[2/5] tokenizer trained on the synthetic text", flush=True)
    scaffolding = [template.SYSTEM_PROMPT, "[INST] <<SYS>>\n", "\n<</SYS>>\n\n", " [/INST] ", " </s>"] * 40
    tok = train_tokenizer(synthetic.corpus(raw) + scaffolding, os.path.join(data, "tokenizer"), vocab_size=512)
    print(f"  vocabulary {len(tok)}", flush=True)

    common = {"data.root": os.path.join(data, "records"), "data.tokenizer": os.path.join(data, "tokenizer"),
              "seed": a.seed, "mesh.num_devices": 1, "mesh.shape": "(1,1,1)"}
    steps = {k: max(4, int(round(v * a.scale))) for k, v in STEPS.items()}
    plan = [("stage0", "stage0", {}), ("stage1", "stage1", {"init.from_workdir": "stage0"}),
            ("stage2", "stage2", {"init.from_workdir": "stage1"}), ("stage3", "stage3", {"init.from_workdir": "stage2"}),
            ("baseline_stage3", "stage3", {"init.from_workdir": "stage0", "fusion": "none",
                                           "trainable": repr(BASELINE_TRAINABLE)})]
    print("[3/5] training: init -> stage 1 -> stage 2 -> stage 3, and the VideoLLaMA2 baseline", flush=True)
    timings, curves = {}, {}
    for name, stage, extra in plan:
        overrides = dict(common, num_train_steps=steps[stage], checkpoint_every=steps[stage])
        overrides.update({k: (os.path.join(work, v) if k == "init.from_workdir" else v) for k, v in extra.items()})
        workdir = os.path.join(work, name)
        timings[name] = chain.run_stage(stage, "demo", workdir, overrides, os.path.join(logs, f"{name}.log"))
        curves[name] = losses(workdir)
        print(f"  {name}: {steps[stage]} steps, loss {curves[name][0][1]:.3f} -> {curves[name][-1][1]:.3f} "
              f"({timings[name]:.0f} s)", flush=True)

    print("[4/5] held-out multiple-choice clips", flush=True)
    rows = {}
    models = {"Exo2Ego (init, 1, 2, 3)": os.path.join(work, "stage3", "export"),
              "VideoLLaMA2 baseline (init, 3)": os.path.join(work, "baseline_stage3", "export")}
    for label, path in models.items():
        model = load_model(path)
        out = os.path.join(work, "eval", os.path.basename(os.path.dirname(path)))
        print(f"  {label}", flush=True)
        ll = run_benchmark("mcq_json", raw, model, out, settings=EvalSettings(mode="loglik"))
        gen = run_benchmark("mcq_json", raw, model, out + "_letters", settings=EvalSettings(mode="generate"))
        rows[label] = (ll["mcq_json"], gen["mcq_json"], gen.get("mcq_json_unparsed", 0), ll["mcq_json_n"])
        if label.startswith("Exo2Ego"):
            full_model = model

    print("[5/5] one question about a held-out clip", flush=True)
    with open(os.path.join(raw, "mcq_val.json")) as f:
        item = json.load(f)[0]
    answer = answer_question(full_model, os.path.join(raw, item["video"]), synthetic.MC_QUESTION,
                             start=item["start"], end=item["end"], max_new_tokens=16)
    truth = item["options"][item["answer"]]

    plot_losses({k: curves[k] for k in ("stage0", "stage1", "stage2", "stage3")}, os.path.join(work, "losses.png"))
    plot_losses({"Exo2Ego stage3": curves["stage3"], "baseline stage3": curves["baseline_stage3"]},
                os.path.join(work, "losses_stage3_vs_baseline.png"))
    n = next(iter(rows.values()))[3]
    lines = ["# Exo2Ego demo results", "",
             f"Synthetic ego-exo dataset, seed {a.seed}; {n} held-out four-option questions (chance 25%).", "",
             "| model | MC accuracy, option log-likelihood | MC accuracy, generated letter (unparsed) |",
             "|---|---|---|"]
    lines += [f"| {label} | {ll:.1f}% | {gen:.1f}% ({unparsed}) |" for label, (ll, gen, unparsed, _) in rows.items()]
    lines += ["", "| run | steps | first loss | last loss | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {len(curves[name])} | {curves[name][0][1]:.3f} | {curves[name][-1][1]:.3f} | "
              f"{timings[name]:.0f} |" for name in curves]
    lines += ["", f"Question about `{item['video']}` [{item['start']:.2f}, {item['end']:.2f}] s: "
              f"\"{synthetic.MC_QUESTION}\"", f"- model: \"{answer}\"", f"- truth: \"{truth}\"", "",
              "Loss curves: losses.png, losses_stage3_vs_baseline.png", "",
              f"Total time: {time.time() - started:.0f} s"]
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    print(f"\nwritten to {work}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
