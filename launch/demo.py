"""The embedded end-to-end demo (the README's main command): synthetic ego-exo data -> all stages -> evaluation.

  python launch/demo.py [--workdir /tmp/exo2ego_demo] [--seed 0] [--scale 1.0]

1. Renders the synthetic ego-exo dataset (tabletop takes from a first-person camera that hides which way the
   hand moves the object, and two fixed third-person cameras that show it; Ego-Exo4D's formats; EgoIT
   conversations; 300 held-out four-option questions) and builds its records with the real builders, then
   trains a Mistral-style BPE tokenizer on its training text.
2. Runs Exo2Ego (init -> stage 1 -> stage 2 -> stage 3) and the VideoLLaMA2 baseline trained on the same data
   with the same budget (init -> ego captioning as long as stages 1 and 2 -> stage 3 on x alone), each stage
   through `launch/stageN.py --config configs/stageN.py:demo` (the code users run on GPU pods).
3. Scores the held-out questions for both with `launch/evaluate.py` (option log-likelihood), reports each
   accuracy with n and a 95% interval and the paired difference with its interval, probes every stage's
   features for the action (launch/probe.py's linear probes; F(x) after stage 2 is where the exo knowledge
   should show), answers one question about a held-out clip, and writes WORKDIR/results.md and loss-curve PNGs.
Deterministic from --seed on one machine (float results can differ between CPUs). `--scale` multiplies the
step counts (0.01 for a smoke run).
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

import numpy as np

from exo2ego_jax.data import synthetic
from exo2ego_jax.errors import run_cli
from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.eval.stats import paired_bootstrap, wilson_interval
from exo2ego_jax.serve.inference import answer_question, load_model
from exo2ego_jax.configfile import load_config_file
from exo2ego_jax.study import ablation, chain, probes, report
from exo2ego_jax.study import runs as study
from exo2ego_jax.paths import absolute

BUDGET = ablation.FULL  # the ablation study's budget (launch/ablate.py)
LABELS = {"full": "Exo2Ego (init, 1, 2, 3)", "baseline": "VideoLLaMA2 baseline (init, captioning, 3)"}


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
    p.add_argument("--workdir", type=absolute, default="/tmp/exo2ego_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--parallel", type=int, default=2, help="stage runs at a time")
    a = p.parse_args(argv)
    started, code = time.time(), commit()  # the code that runs, whatever the checkout holds later
    work = os.path.abspath(a.workdir)
    runs = os.path.join(work, "runs")
    env = study.compile_cache_env(work)

    print("[1/4] synthetic ego-exo dataset and tokenizer", flush=True)
    data = study.prepare_data(os.path.join(work, "data"), "demo")

    budget = study.Budget(*(max(2, int(round(v * a.scale))) for v in vars(BUDGET).values()))
    print(f"[2/4] training Exo2Ego and the baseline (steps {vars(budget)})", flush=True)
    common = {"data.root": data["records"], "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1,
              "mesh.shape": "(1,1,1)", "log_every": 5}
    caption_lr = ablation.setup({})["learning_rates"]["captioning"]
    jobs = study.plan(("full", "baseline"), a.seed, budget, common, caption_lr)
    timings = study.run_jobs(jobs, runs, parallel=a.parallel, echo=False, env=env)

    print("[3/4] held-out questions", flush=True)
    with open(os.path.join(data["raw"], "mcq_test.json")) as f:
        items = json.load(f)
    rows, tasks, outs = {}, {}, {}
    for v in ("full", "baseline"):
        export = os.path.join(runs, study.final_job(a.seed, v), "export")
        out = outs[v] = os.path.join(work, "eval", v)
        log = os.path.join(runs, "logs", f"eval_{v}.log")
        tasks[v] = (None, lambda export=export, out=out, log=log: study.evaluate(
            export, data["raw"], out, item_file="mcq_test.json", video_key="video", log=log, env=env))
    study.run_tasks(tasks, a.parallel)
    correct = {v: np.asarray(study.correctness(os.path.join(outs[v], "mcq_json", "predictions.jsonl"), items))
               for v in outs}
    n = len(items)
    for v, c in correct.items():
        lo, hi = wilson_interval(int(c.sum()), n)
        rows[v] = (100.0 * c.mean(), 100.0 * lo, 100.0 * hi)
    diff = paired_bootstrap(correct["full"], correct["baseline"])
    model_cfg = load_config_file(chain.config_path("stage0"), "demo").model
    prober = probes.prober_for(data["raw"], "mcq_test.json", num_frames=model_cfg.num_frames,
                               image_size=model_cfg.clip.image_size, cache_dir=os.path.join(work, "data"))
    seeds_of = {"full": (a.seed,), "baseline": (a.seed,)}
    probe_table = probes.study_probes(prober, runs, list(seeds_of), seeds_of, study.stage_jobs, study.video_key)
    fx = probe_table["full"]["stage2"]["Fx"]

    print("[4/4] one question about a held-out clip", flush=True)
    item = items[0]
    model = load_model(os.path.join(runs, study.final_job(a.seed, "full"), "export"))
    answer = answer_question(model, os.path.join(data["raw"], item["video"]), synthetic.MC_QUESTION,
                             start=item["start"], end=item["end"], max_new_tokens=16)
    truth = item["options"][item["answer"]]

    names = {"init": f"seed{a.seed}/init", "stage1": f"seed{a.seed}/stage1", "stage2": f"seed{a.seed}/stage2_full",
             "stage3": f"seed{a.seed}/stage3_full", "baseline captioning": f"seed{a.seed}/caption_baseline",
             "baseline stage3": f"seed{a.seed}/stage3_baseline"}
    curves = {k: losses(os.path.join(runs, v)) for k, v in names.items()}
    plot_losses({k: curves[k] for k in ("init", "stage1", "stage2", "stage3")}, os.path.join(work, "losses.png"))
    plot_losses({"Exo2Ego stage3": curves["stage3"], "baseline stage3": curves["baseline stage3"]},
                os.path.join(work, "losses_stage3_vs_baseline.png"))
    lines = ["# Exo2Ego demo results", "",
             f"Synthetic ego-exo task, seed {a.seed}; n = {n} held-out four-option questions from takes never "
             "trained on (chance 25%); option log-likelihood after the bare question (the prompt the synthetic "
             "instruction data uses); 95% intervals (Wilson for an accuracy, paired "
             "bootstrap over questions for the difference).", "",
             "| model | accuracy | 95% CI |", "|---|---|---|"]
    lines += [f"| {LABELS[v]} | {acc:.1f}% | [{lo:.1f}, {hi:.1f}] |" for v, (acc, lo, hi) in rows.items()]
    lines += ["", f"Exo2Ego - baseline: {100 * diff['diff']:+.1f} points, 95% CI [{100 * diff['ci95'][0]:+.1f}, "
              f"{100 * diff['ci95'][1]:+.1f}].", "",
              f"Linear probe of the action on F(x) after stage 2: {fx['accuracy']:.1f}% [{fx['ci95'][0]:.1f}, "
              f"{fx['ci95'][1]:.1f}] (n = {fx['n']}; fit on {len(prober.train['video'])} training clips). "
              "Every stage and feature (x: ego encoder, y: exo encoder, Fx: F(x), stc_*: the connector's tokens; "
              "the baseline's captioning run stands at stage 2):", ""] + report.probe_markdown(probe_table) + ["",
              "| run | steps | first loss | last loss | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {curve[-1][0]} | {curve[0][1]:.3f} | {curve[-1][1]:.3f} | "
              f"{timings.get(names[k], float('nan')):.0f} |" for k, curve in curves.items()]
    lines += ["", f"Question about `{item['video']}` [{item['start']:.2f}, {item['end']:.2f}] s: "
              f"\"{synthetic.MC_QUESTION}\"", f"- model: \"{answer}\"", f"- truth: \"{truth}\"", "",
              "Loss curves: losses.png, losses_stage3_vs_baseline.png", "",
              f"Commit {code}, {machine()}; total time {time.time() - started:.0f} s"]
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    print(f"\nwritten to {work}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
