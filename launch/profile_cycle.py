"""Profile the stage-2 cycle-consistency train step with XLA's tools.

  python launch/profile_cycle.py --config configs/stage2.py:tiny --trace_dir /tmp/profile_stage2
  python launch/profile_cycle.py --config configs/stage2.py:7b --trace_dir $OUT/profile --steps 5   # GPU

Writes into --trace_dir: hlo/stage2_step.{stablehlo.mlir,after_optimizations.hlo.txt} (only this module),
cost_analysis.json (FLOPs, bytes accessed), memory_analysis.json, a jax.profiler trace of --steps steps after
--warmup that TensorBoard/XProf opens (plugins/profile/...), and summary.json; prints the step time, achieved
TFLOP/s, the share of time in CLIP, mappers, losses, STC, LLM and the optimizer, and the top ops by time.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse

import jax
import jax.numpy as jnp

from exo2ego_jax.bench.profile import attribute, hlo_op_names, load_trace_events
from exo2ego_jax.bench.timing import device_kind, print_table
from exo2ego_jax.configfile import load_config_file, split_config_args
from exo2ego_jax.errors import ConfigError, run_config_cli
from exo2ego_jax.train.batches import global_batch, to_model_batch
from exo2ego_jax.train.config import resolve
from exo2ego_jax.train.loop import prepare
from exo2ego_jax.paths import absolute

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "stage2.py") + ":tiny"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/profile_cycle.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE:PRESET", help="a stage-2 config (default configs/stage2.py:tiny); "
                                                           "--config.FIELD=VALUE overrides its fields")
    p.add_argument("--trace_dir", type=absolute, required=True, help="output folder")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before the trace starts")
    p.add_argument("--top", type=int, default=10, help="how many top ops to print")
    return p


def analysis_to_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return {k: float(v) for k, v in obj.items() if isinstance(v, (int, float))}
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_") and isinstance(getattr(obj, k), (int, float))}


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def profile(c, trace_dir: str, *, steps: int, warmup: int, top: int) -> dict:
    if c.stage != "stage2":
        raise ConfigError(f"config field 'stage' is {c.stage!r}: this tool profiles the stage-2 step (configs/stage2.py)")
    c.export.enabled = False
    setup = prepare(resolve(c))
    batch = global_batch(to_model_batch(next(setup.data), jnp.dtype(c.compute_dtype)), setup.layout.batch)
    os.makedirs(os.path.join(trace_dir, "hlo"), exist_ok=True)
    with jax.set_mesh(setup.mesh):
        lowered = setup.step_fn.lower(setup.state, setup.frozen, batch)
        t = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t
    with open(os.path.join(trace_dir, "hlo", "stage2_step.stablehlo.mlir"), "w") as f:
        f.write(lowered.as_text())
    hlo_text = compiled.as_text()
    with open(os.path.join(trace_dir, "hlo", "stage2_step.after_optimizations.hlo.txt"), "w") as f:
        f.write(hlo_text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost = analysis_to_dict(cost)
    memory = analysis_to_dict(compiled.memory_analysis())
    write_json(os.path.join(trace_dir, "cost_analysis.json"), cost)
    write_json(os.path.join(trace_dir, "memory_analysis.json"), memory)

    state, frozen = setup.state, setup.frozen
    with jax.set_mesh(setup.mesh):
        for _ in range(warmup):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(state)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t = time.perf_counter()
            for i in range(steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, metrics = compiled(state, frozen, batch)
                    jax.block_until_ready(metrics)
            step_s = (time.perf_counter() - t) / steps
    rows, top_ops = attribute(load_trace_events(trace_dir), hlo_op_names(hlo_text), steps=steps, step_time_s=step_s,
                              top=top)
    flops = cost.get("flops", 0.0)
    summary = dict(device=device_kind(), preset=c.preset, step_time_s=step_s, compile_s=compile_s, flops=flops,
                   bytes_accessed=cost.get("bytes accessed", 0.0), tflops_per_s=flops / step_s / 1e12,
                   components=rows, top_ops=top_ops, memory=memory,
                   loss={k: float(v) for k, v in jax.device_get(metrics).items()})
    write_json(os.path.join(trace_dir, "summary.json"), summary)

    print(f"stage-2 step on {summary['device']} ({c.preset}): {step_s * 1e3:.2f} ms/step, "
          f"{flops / 1e9:.2f} GFLOP/step (XLA cost analysis), {summary['tflops_per_s']:.3f} TFLOP/s, "
          f"compile {compile_s:.1f} s")
    print_table([dict(r, ms=r["seconds"] * 1e3, pct=100 * r["share"]) for r in rows],
                [("component", "component", ""), ("ms", "ms/step", ".3f"), ("pct", "% of step", ".1f")])
    print()
    print_table([dict(o, ms=o["seconds"] * 1e3, op_name=o["op_name"][-90:]) for o in top_ops],
                [("op", "HLO op", ""), ("component", "component", ""), ("ms", "ms/step", ".3f"),
                 ("op_name", "op_name (tail)", "")])
    print(f"\ntrace: {trace_dir} (tensorboard --logdir {trace_dir}, Profile tab; or ui.perfetto.dev on "
          "plugins/profile/*/perfetto_trace.json.gz)")
    return summary


def main(argv) -> int:
    path, preset, overrides, rest = split_config_args(argv, default=DEFAULT_CONFIG)
    a = parser().parse_args(rest)
    profile(load_config_file(path, preset, overrides), a.trace_dir, steps=a.steps, warmup=a.warmup, top=a.top)
    return 0


if __name__ == "__main__":
    run_config_cli(parser, main)
