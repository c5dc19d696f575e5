"""Probing a finished study's workdir (`launch/probe.py`): find its variants and seeds, probe every stage."""
from __future__ import annotations

import os
import re

from exo2ego_jax.configfile import load_config_file
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.study import chain, probes, report, runs


def found_runs(runs_dir: str) -> dict[str, tuple[int, ...]]:
    """{variant: seeds} with a finished stage-3 export under `runs_dir`."""
    out: dict[str, list[int]] = {}
    for entry in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        m = re.fullmatch(r"seed(\d+)", entry)
        if not m:
            continue
        for v in runs.VARIANTS:
            if os.path.exists(os.path.join(runs_dir, runs.final_job(int(m.group(1)), v), "export", "model_config.json")):
                out.setdefault(v, []).append(int(m.group(1)))
    return {v: tuple(sorted(s)) for v, s in out.items()}


def run(workdir: str, items: str = "test") -> dict:
    work = os.path.abspath(workdir)
    raw, runs_dir = os.path.join(work, "data", "raw"), os.path.join(work, "runs")
    item_file = f"mcq_{items}.json"
    if not os.path.exists(os.path.join(raw, item_file)):
        raise ConfigError(f"--workdir {workdir!r} holds no synthetic study data ({raw}/{item_file} is missing); "
                          "give the workdir of launch/ablate.py or launch/demo.py")
    seeds_of = found_runs(runs_dir)
    if not seeds_of:
        raise ConfigError(f"--workdir {workdir!r} has no finished stage-3 run under {runs_dir}; run "
                          "launch/ablate.py or launch/demo.py into it first")
    model_cfg = load_config_file(chain.config_path("stage0"), "demo").model
    prober = probes.prober_for(raw, item_file, num_frames=model_cfg.num_frames, image_size=model_cfg.clip.image_size,
                               cache_dir=os.path.join(work, "data"))
    table = probes.study_probes(prober, runs_dir, list(seeds_of), seeds_of, runs.stage_jobs, runs.video_key)
    result = {"probes": table, "seeds": seeds_of, "items": item_file, "n_train": len(prober.train["video"]),
              "commit": commit(), "machine": machine()}
    path = os.path.join(work, f"probes_{items}.json")
    runs.write_json(path, result)
    print("\n".join(report.probe_markdown(table)))
    print(f"\nwritten to {path}")
    return result
