"""Profile the stage-2 cycle-consistency train step with XLA's tools, on a device or, without one, from the
compiled program's per-kernel estimate.

  python launch/profile_cycle.py --config configs/stage2.py:tiny --trace_dir /tmp/profile_stage2
  python launch/profile_cycle.py --config configs/stage2.py:7b --trace_dir $OUT/profile --steps 5   # GPU
  python launch/profile_cycle.py --config configs/stage2.py:7b --target h100 --topology 1x1x8      # no GPU

On a device: writes into --trace_dir hlo/stage2_step.{stablehlo.mlir,after_optimizations.hlo.txt} (only this
module), cost_analysis.json (FLOPs, bytes accessed), memory_analysis.json, a jax.profiler trace of --steps steps
after --warmup that TensorBoard/XProf opens (plugins/profile/...), and summary.json; prints the step time,
achieved TFLOP/s, the time of each part (CLIP towers, mappers F and G, losses, STC, LLM, optimizer) measured from
the trace beside the per-kernel estimate of the same program (exo2ego_jax/bench/estimate.py), and the top ops.

With --target (h100, h200, a TPU slice such as v5p-64, or cpu) nothing runs: the step is compiled for the
target's topology exactly as launch/aot_compile.py does, and the estimate's per-part table is printed (and
written to --trace_dir/estimate.json with the optimized HLO, when --trace_dir is given).
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.bench.environment import prepare_from_argv

prepare_from_argv(None)  # --target: compile on the CPU platform for a device this machine lacks

import argparse

import jax
import jax.numpy as jnp

from exo2ego_jax.bench import estimate as estimate_lib
from exo2ego_jax.bench.aot import compile_step, model_flops, report, target_devices
from exo2ego_jax.bench.profile import attribute, hlo_op_names, load_trace_events
from exo2ego_jax.bench.targets import TARGETS, parse_target
from exo2ego_jax.bench.timing import device_kind, print_table, this_device_target
from exo2ego_jax.configfile import load_config_file, split_config_args
from exo2ego_jax.errors import ConfigError, run_config_cli
from exo2ego_jax.train.batches import global_batch, to_model_batch
from exo2ego_jax.train.config import resolve, resolve_for_compile
from exo2ego_jax.train.hardware import hardware_of
from exo2ego_jax.train.loop import prepare
from exo2ego_jax.paths import absolute

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "stage2.py") + ":tiny"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/profile_cycle.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE:PRESET", help="a stage-2 config (default configs/stage2.py:tiny); "
                                                           "--config.FIELD=VALUE overrides its fields")
    p.add_argument("--trace_dir", type=absolute, help="output folder (required when profiling on a device)")
    p.add_argument("--target", help="compile for this device instead of running on one: h100, h200, cpu or a "
                                    "TPU (v5p-64, v6e --topology 1x16x4, ...); prints the per-kernel estimate")
    p.add_argument("--topology", help="SxHxG with --target (GPUs: 1x1x8 by default)")
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


def check_stage(c) -> None:
    if c.stage != "stage2":
        raise ConfigError(f"config field 'stage' is {c.stage!r}: this tool profiles the stage-2 step (configs/stage2.py)")


def estimate_without_device(c, target_name: str, topology: str | None, trace_dir: str | None,
                            explicit=None) -> dict:
    """Compile the stage-2 step for `target_name` x `topology` and print its per-kernel estimate by part."""
    check_stage(c)
    try:
        target, topo = parse_target(target_name, topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    devices = target_devices(target, topo)
    run = resolve_for_compile(c, hardware_of(devices[0]), explicit)
    compiled = compile_step(run, devices, num_hosts=topo.num_hosts)
    r = report(compiled, target, topo)
    if compiled.executable is None:
        raise ConfigError(f"the stage-2 step does not fit on {topo} x {target.name}: "
                          f"{r['out_of_memory']['message']}")
    e, b = r["estimate"], r["bound"]
    print(f"stage-2 step ({c.preset}) compiled for {topo} x {target.name} in {r['compile_s']:.0f} s, no device: "
          f"estimated {e['step_s'] * 1e3:.1f} ms/step (compute-only bound {b['step_s'] * 1e3:.1f} ms), MFU "
          f"{100 * (e['mfu'] or 0):.1f}%, memory-bound kernels {e['memory_bound_s'] * 1e3:.1f} ms, exposed "
          f"collectives {e['exposed_collectives_s'] * 1e3:.1f} ms; {r['memory']['total'] / 2 ** 30:.1f} GiB per device")
    print_table(estimate_lib.part_rows(e["by_part"], e["step_s"]), estimate_lib.PART_COLUMNS)
    if trace_dir:
        os.makedirs(os.path.join(trace_dir, "hlo"), exist_ok=True)
        with open(os.path.join(trace_dir, "hlo", "stage2_step.after_optimizations.hlo.txt"), "w") as f:
            f.write(compiled.executable.as_text())
        write_json(os.path.join(trace_dir, "estimate.json"), r)
    return r


def profile(c, trace_dir: str, *, steps: int, warmup: int, top: int) -> dict:
    check_stage(c)
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
    n = setup.mesh.devices.size
    useful = model_flops(setup.run, batch["input_ids"].shape[1])["total"] / n
    target = this_device_target()
    est = estimate_lib.estimate(hlo_text, target, num_devices=n, useful_flops=useful)
    summary = dict(device=device_kind(), preset=c.preset, step_time_s=step_s, compile_s=compile_s, flops=flops,
                   bytes_accessed=cost.get("bytes accessed", 0.0), tflops_per_s=flops / step_s / 1e12,
                   components=rows, top_ops=top_ops, memory=memory,
                   estimate=dict(target=target.name, step_s=est["step_s"], mfu=est["mfu"], by_part=est["by_part"],
                                 exposed_collectives_s=est["exposed_collectives_s"]),
                   loss={k: float(v) for k, v in jax.device_get(metrics).items()})
    write_json(os.path.join(trace_dir, "summary.json"), summary)

    print(f"stage-2 step on {summary['device']} ({c.preset}): {step_s * 1e3:.2f} ms/step, "
          f"{flops / 1e9:.2f} GFLOP/step (XLA cost analysis), {summary['tflops_per_s']:.3f} TFLOP/s, "
          f"compile {compile_s:.1f} s")
    print_table([dict(r, ms=r["seconds"] * 1e3, pct=100 * r["share"],
                      est_ms=est["by_part"].get(r["part"], {}).get("est_s", 0.0) * 1e3) for r in rows],
                [("component", "component", ""), ("ms", "measured ms/step", ".3f"), ("pct", "% of step", ".1f"),
                 ("est_ms", f"estimated ms/step ({target.name})", ".3f")])
    print(f"per-kernel estimate of this program on {target.name}: {est['step_s'] * 1e3:.3f} ms/step; measured "
          f"{step_s * 1e3:.3f} ms/step" + (" (nominal CPU figures: the estimate is a GPU/TPU model)"
                                           if target is TARGETS["cpu"] else ""))
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
    c = load_config_file(path, preset, overrides)
    if a.target:
        estimate_without_device(c, a.target, a.topology, a.trace_dir, set(overrides))
        return 0
    if not a.trace_dir:
        raise ConfigError("--trace_dir is required to profile on this machine's devices (or pass --target h100 "
                          "--topology 1x1x8 for the estimate without a device)")
    profile(c, a.trace_dir, steps=a.steps, warmup=a.warmup, top=a.top)
    return 0


if __name__ == "__main__":
    run_config_cli(parser, main)
