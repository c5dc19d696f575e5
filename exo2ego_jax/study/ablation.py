"""The ablation study end to end (`launch/ablate.py`): train every variant's chain for its seeds, score the
questions, probe every stage's export, and write results.{json,md,png}."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import time

import numpy as np

from exo2ego_jax.configfile import load_config_file
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.study import chain, probes, report, runs

VARIANTS = runs.VARIANTS
STUDY_VARIANTS = runs.STUDY_VARIANTS
# Compared on the most seeds: the method, its baseline, its most questioned term and the task's ceiling.
PRIMARY = ("full", "baseline", "wo_kl", "exo_oracle")
# Steps per stage (batch 8), the same for every variant. Checked on the validation questions only with the
# baseline and the exo-view oracle: at this budget the oracle learns the task with every seed.
FULL = runs.Budget(stage0=480, stage1=100, stage2=140, stage3=400)
QUICK = runs.Budget(stage0=4, stage1=2, stage2=2, stage3=4)


@dataclasses.dataclass(frozen=True)
class Options:
    workdir: str
    variants: tuple[str, ...] = STUDY_VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    secondary_seeds: tuple[int, ...] = ()     # empty: the first three of `seeds`
    quick: bool = False
    parallel: int = 2
    budget: str = ""                          # "s0,s1,s2,s3" steps instead of FULL
    items: str = "test"                       # or "val" (choosing settings)
    overrides: dict = dataclasses.field(default_factory=dict)  # config overrides for every stage run
    echo: bool = False


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def parse_overrides(pairs) -> dict:
    """["model.mapper.norm=instance", ...] -> {key: value}; values are Python literals or plain strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: write KEY=VALUE, e.g. --set model.mapper.norm=instance")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def seeds_by_variant(o: Options) -> dict[str, tuple[int, ...]]:
    if o.quick:
        return dict.fromkeys(o.variants, (0,))
    secondary = o.secondary_seeds or o.seeds[:3]
    return {v: o.seeds if v in PRIMARY else secondary for v in o.variants}


def setup(overrides: dict) -> dict:
    """What the study's chain starts from and how fast each stage learns, read from the demo configs (with the
    study's overrides): the premise the paper's mechanism relies on, made explicit."""
    cfg = {f: load_config_file(chain.config_path(f), "demo", overrides) for f in chain.STAGE_FILES}
    init = cfg["stage0"]
    exo = float(init.data.exo_fraction)
    return {"init_views": {"exo": exo, "ego": round(1.0 - exo, 6)}, "shared_tower": bool(init.init.shared_tower),
            "mapper_residual": bool(init.model.mapper.residual), "mapper_norm": str(init.model.mapper.norm),
            "learning_rates": {"init": init.optim.learning_rate, "stage1": cfg["stage1"].optim.learning_rate,
                               "stage2": cfg["stage2"].optim.learning_rate, "stage3": cfg["stage3"].optim.learning_rate,
                               "captioning": cfg["stage1"].optim.learning_rate}}


def _evaluation(export, raw, out, item_file, video_key, log, env):
    return lambda: runs.evaluate(export, raw, out, item_file=item_file, video_key=video_key, log=log, env=env)


def run(o: Options) -> dict:
    started, code = time.time(), commit()  # the code that runs, whatever the checkout holds later
    unknown = sorted(set(o.variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds_of = seeds_by_variant(o)
    budget = QUICK if o.quick else FULL
    if o.budget:
        budget = runs.Budget(*(int(x) for x in o.budget.split(",")))
    work = os.path.abspath(o.workdir)
    data = runs.prepare_data(os.path.join(work, "data"), "tests" if o.quick else "demo")
    runs_dir = os.path.join(work, "runs")
    env = runs.compile_cache_env(work)
    common = {"data.root": data["records"], "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1,
              "mesh.shape": "(1,1,1)", "log_every": 10, **o.overrides}
    the_setup = setup(o.overrides)
    jobs: dict = {}
    for seed in sorted({s for ss in seeds_of.values() for s in ss}):
        variants = tuple(v for v in o.variants if seed in seeds_of[v])
        jobs.update(runs.plan(variants, seed, budget, common, the_setup["learning_rates"]["captioning"]))
    print(f"{len(jobs)} stage runs for {len(o.variants)} variants; seeds {seeds_of}; budget {budget}", flush=True)
    runs.run_jobs(jobs, runs_dir, parallel=o.parallel, echo=o.echo, env=env)

    item_file = f"mcq_{o.items}.json"
    with open(os.path.join(data["raw"], item_file)) as f:
        items = json.load(f)
    evals, tasks = {}, {}
    for v, seeds in seeds_of.items():
        for seed in seeds:
            export = os.path.join(runs_dir, runs.final_job(seed, v), "export")
            out = evals[(seed, v)] = os.path.join(work, f"eval_{o.items}", f"seed{seed}", v)
            log = os.path.join(runs_dir, "logs", f"eval_seed{seed}_{v}.log")
            tasks[f"eval seed{seed}/{v}"] = (None, _evaluation(export, data["raw"], out, item_file, runs.video_key(v),
                                                               log, env))
    runs.run_tasks(tasks, o.parallel)
    correct = {v: np.asarray([runs.correctness(os.path.join(evals[(s, v)], "mcq_json", "predictions.jsonl"), items)
                              for s in seeds]) for v, seeds in seeds_of.items()}
    results = report.summarize(correct, seeds_of, len(items))

    print("probes: every stage's export of every variant and seed", flush=True)
    probe_started = time.time()
    model_cfg = load_config_file(chain.config_path("stage0"), "demo").model
    prober = probes.prober_for(data["raw"], item_file, num_frames=model_cfg.num_frames,
                               image_size=model_cfg.clip.image_size, cache_dir=os.path.join(work, "data"))
    results["probes"] = probes.study_probes(prober, runs_dir, o.variants, seeds_of, runs.stage_jobs, runs.video_key)
    results["probe_n_train"] = len(prober.train["video"])
    print(f"  probes: {runs.elapsed(probe_started)}", flush=True)

    results.update(mode="quick" if o.quick else "full", budget=vars(budget), commit=code, machine=machine(),
                   elapsed_s=round(time.time() - started, 1), prompt=runs.PROMPT, scoring="option log-likelihood",
                   setup=the_setup, overrides=o.overrides, items=item_file)
    stem = os.path.join(work, "results" if o.items == "test" else "results_val")
    runs.write_json(stem + ".json", results)
    report.write_markdown(stem + ".md", results)
    report.plot(stem + ".png", results)
    with open(stem + ".md") as f:
        print("\n" + f.read())
    print(f"written to {stem}.{{json,md,png}} in {runs.elapsed(started)}")
    return results
