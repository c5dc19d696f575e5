"""The ablation study on the synthetic ego-exo task: every variant through the launch scripts, matched budgets,
several seeds, scored on held-out questions, with paired confidence intervals.

  python launch/ablate.py --workdir W [--variants full,baseline,...] [--seeds 0,1,2] [--quick] [--parallel 2]

Variants (launch/study.py): full, baseline (VideoLLaMA2 on the same data), wo_kl, fwd_cycle, wo_cycle,
fc_mapper, wo_lora, kl_pooled (the KL on pooled features), exo_oracle (the exo camera at test time).
The data (seed 0, the `demo` size: 40 training takes; 300 four-option questions from 50 held-out takes) is
built once in W/data; the runs go to W/runs/seed<S>/..., their logs to W/runs/logs. Each variant's stage-3
export answers W/data/raw/mcq_test.json by option log-likelihood (launch/evaluate.py). Writes W/results.json
  {"n_items", "variants": {name: {"accuracy": [per seed], "mean", "std", "ci95"}},
   "comparisons": {"full-baseline": {"diff", "ci95"}, ...}, ...}
(accuracies in %; intervals from a paired bootstrap over items and seeds), W/results.md and W/results.png.
The held-out questions are never used to choose anything; W/data/raw/mcq_val.json is the validation set.
A rerun resumes: finished stage runs and evaluations are kept. --quick: one seed, the `tests` data size
(a handful of questions) and a few steps per stage, to check the whole path in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import study
from exo2ego_jax.errors import ConfigError, run_cli
from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.eval.stats import bootstrap_mean, paired_bootstrap
from exo2ego_jax.configfile import load_config_file

# Steps per stage (batch 8). Checked on the validation questions (mcq_val.json) only, with the baseline and the
# exo-view oracle: at this budget the oracle learns the task with every seed (data/synthetic.py's ego_cue note
# has the figures). The whole study (9 variants x 3 seeds) takes about an hour on 2 cores.
FULL = study.Budget(stage0=480, stage1=100, stage2=140, stage3=400)
QUICK = study.Budget(stage0=4, stage1=2, stage2=2, stage3=4)


def summarize(correct: dict, variants, seeds, n_items: int) -> dict:
    out = {"n_items": n_items, "seeds": list(seeds), "variants": {}, "comparisons": {}}
    for v in variants:
        per_seed = [100.0 * float(np.mean(correct[v][s])) for s in range(len(seeds))]
        boot = bootstrap_mean(correct[v])
        out["variants"][v] = {"accuracy": per_seed, "mean": float(np.mean(per_seed)),
                              "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                              "ci95": [100.0 * boot["ci95"][0], 100.0 * boot["ci95"][1]]}
    for name in study.COMPARISONS:
        a, b = name.split("-", 1)
        if a in correct and b in correct:
            d = paired_bootstrap(correct[a], correct[b])
            out["comparisons"][name] = {"diff": 100.0 * d["diff"], "ci95": [100.0 * d["ci95"][0], 100.0 * d["ci95"][1]]}
    return out


def write_markdown(path: str, r: dict) -> None:
    lines = [f"# Ablation study on the synthetic ego-exo task ({r['mode']}, {r['items']})", "",
             f"{r['n_items']} four-option questions (chance 25%), seeds {r['seeds']}, option log-likelihood. "
             f"Commit {r['commit']}, {r['machine']}, {r['elapsed_s'] / 60:.0f} min.", "",
             "| variant | accuracy (mean ± std over seeds) | 95% CI | per seed |", "|---|---|---|---|"]
    for v, x in r["variants"].items():
        lines.append(f"| {v} | {x['mean']:.1f} ± {x['std']:.1f} | [{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}] | "
                     + ", ".join(f"{a:.1f}" for a in x["accuracy"]) + " |")
    lines += ["", "| comparison | difference (points) | 95% CI (paired bootstrap over items and seeds) |",
              "|---|---|---|"]
    lines += [f"| {k} | {c['diff']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |"
              for k, c in r["comparisons"].items()]
    lines += ["", f"Budgets (steps of batch 8): {r['budget']}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, r: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(r["variants"])
    means = [r["variants"][v]["mean"] for v in names]
    err = np.array([[m - r["variants"][v]["ci95"][0], r["variants"][v]["ci95"][1] - m] for v, m in zip(names, means)]).T
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3.2))
    ax.bar(names, means, yerr=err, capsize=3, color=["C1" if v == "full" else "C0" for v in names])
    ax.axhline(25, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{r['n_items']} questions, seeds {r['seeds']}; 95% CI", fontsize=9)
    ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--variants", default=",".join(study.VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="one seed, tiny data and budgets: the path in minutes")
    p.add_argument("--parallel", type=int, default=2, help="stage runs at a time")
    p.add_argument("--budget", default="", help="steps of stage0,stage1,stage2,stage3 instead of the study's")
    p.add_argument("--items", choices=("test", "val"), default="test",
                   help="test: the held-out questions (reporting); val: the validation questions (choosing settings)")
    p.add_argument("--echo", action="store_true", help="show every stage's output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    started, code = time.time(), commit()  # the code that runs, whatever the checkout holds later
    variants = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(variants) - set(study.VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {list(study.VARIANTS)}")
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",") if s]
    budget = QUICK if a.quick else FULL
    if a.budget:
        budget = study.Budget(*(int(x) for x in a.budget.split(",")))
    work = os.path.abspath(a.workdir)
    data = study.prepare_data(os.path.join(work, "data"), "tests" if a.quick else "demo")
    runs = os.path.join(work, "runs")
    # One compilation cache for every stage run: the variants share their programs' shapes.
    env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(work, "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    common = {"data.root": data["records"], "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1,
              "mesh.shape": "(1,1,1)", "log_every": 10}
    stage1_lr = load_config_file(os.path.join(study.chain.ROOT, "configs", "stage1.py"), "demo").optim.learning_rate
    jobs = {}
    for seed in seeds:
        jobs.update(study.plan(variants, seed, budget, common, stage1_lr))
    print(f"{len(jobs)} stage runs for {len(variants)} variants x seeds {seeds}; budget {budget}", flush=True)
    study.run_jobs(jobs, runs, parallel=a.parallel, echo=a.echo, env=env)

    item_file = f"mcq_{a.items}.json"
    with open(os.path.join(data["raw"], item_file)) as f:
        items = json.load(f)
    evals, tasks = {}, {}
    for seed in seeds:
        for v in variants:
            export = os.path.join(runs, study.final_job(seed, v), "export")
            out = evals[(seed, v)] = os.path.join(work, f"eval_{a.items}", f"seed{seed}", v)
            key = "exo_video" if v == "exo_oracle" else "video"
            log = os.path.join(runs, "logs", f"eval_seed{seed}_{v}.log")
            tasks[f"eval seed{seed}/{v}"] = (None, lambda export=export, out=out, key=key, log=log: study.evaluate(
                export, data["raw"], out, item_file=item_file, video_key=key, log=log, env=env))
    study.run_tasks(tasks, a.parallel)
    correct = {v: np.asarray([study.correctness(os.path.join(evals[(s, v)], "mcq_json", "predictions.jsonl"), items)
                              for s in seeds]) for v in variants}
    results = summarize(correct, variants, seeds, len(items))
    results.update(mode="quick" if a.quick else "full", budget=vars(budget), commit=code,
                   machine=machine(), elapsed_s=round(time.time() - started, 1),
                   prompt=study.PROMPT, scoring="option log-likelihood")
    results["items"] = item_file
    stem = os.path.join(work, "results" if a.items == "test" else "results_val")
    study.write_json(stem + ".json", results)
    write_markdown(stem + ".md", results)
    plot(stem + ".png", results)
    with open(stem + ".md") as f:
        print("\n" + f.read())
    print(f"written to {stem}.{{json,md,png}} in {study.elapsed(started)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
