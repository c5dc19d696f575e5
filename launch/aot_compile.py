"""Compile a stage's train step for a GPU pod (or N fake CPU devices) on this machine, and report whether it fits.

  python launch/aot_compile.py --config configs/stage3.py:7b --target h100 --topology 1x1x8 [--json FILE]
                               [--config.per_device_batch=1 --config.sharding.frozen=replicated ...]

  --target   h100 (80 GB), h200 (141 GB): XLA's compiler for sm_90a, no GPU needed (`pip install -e '.[aot]'`);
             cpu: N fake CPU devices (the logic on any machine).
  --topology SxHxG: S slices x H hosts x G devices per host (1x2x8 = two 8-GPU hosts).

The step is built by the same code `launch/stageN.py` runs, from abstract shapes only (no weights, no
checkpoint; the architecture is the config's model section), on a mesh of the topology's devices, at the widest
text bucket. Prints a table and writes JSON: fits (the total within usable_bytes: 90% of hbm_bytes, the
share the training CLI lets JAX take, exo2ego_jax/device_memory.py), hbm_bytes, usable_bytes, memory {argument,
output, alias, temp, total} (bytes per device), flops {executed, model} (per device per step), collectives
{kind: {count, bytes}} (per device per step), custom_calls {target: count}, bound {step_s, clips_per_s,
tokens_per_s}. Exit status 1 with a one-line reason when the step does not fit in the device's memory.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _early(flag: str, default: str) -> str:
    """A flag's value before JAX starts (the platform and fake device count must be set first)."""
    for i, arg in enumerate(sys.argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return default


def _prepare_environment() -> None:
    from exo2ego_jax.bench.targets import Topology
    os.environ["JAX_PLATFORMS"] = "cpu"  # GPU targets compile through the CUDA plugin without a GPU
    flags = os.environ.get("XLA_FLAGS", "")
    if _early("target", "h100") == "cpu":
        try:
            n = Topology.parse(_early("topology", "1x1x8")).num_devices
        except ValueError:
            n = 1
        flags += f" --xla_force_host_platform_device_count={n}"
    else:  # no autotuning without a device: cuBLAS calls are closer to a real build than Triton fallbacks
        flags += " --xla_gpu_enable_triton_gemm=false"
    os.environ["XLA_FLAGS"] = flags.strip()


_prepare_environment()

import argparse

from exo2ego_jax.bench.aot import compile_step, report, target_devices
from exo2ego_jax.bench.targets import TARGETS, Topology
from exo2ego_jax.configfile import load_config_file, split_config_args
from exo2ego_jax.errors import ConfigError, run_config_cli
from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.train.config import resolve_for_compile
from exo2ego_jax.paths import absolute


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/aot_compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE:PRESET", help="a stage config, e.g. configs/stage3.py:7b")
    p.add_argument("--target", choices=sorted(TARGETS), default="h100", help="the device to compile for")
    p.add_argument("--topology", default="1x1x8", help="SxHxG: slices x hosts x devices per host")
    p.add_argument("--json", type=absolute, help="write the report here")
    p.add_argument("--model_flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count the model's useful FLOPs (lowers each module once more)")
    return p


GiB = 2 ** 30


def print_report(r: dict) -> None:
    m = r["memory"]
    print(f"{r['stage']} {r['preset']} on {r['topology']} x {r['target']}: mesh {r['mesh']}, batch "
          f"{r['batch_size']} = {r['microbatches']} microbatches x {r['per_device_batch']} per device, text "
          f"{r['text_width']}; compiled in {r['compile_s']:.0f} s")
    print(f"memory per device: {m['total'] / GiB:.2f} GiB of {r['usable_bytes'] / GiB:.1f} usable "
          f"({100 * r['headroom']:.0f}% free; the device has {r['hbm_bytes'] / GiB:.1f}): arguments "
          f"{m['argument'] / GiB:.2f}, outputs {m['output'] / GiB:.2f}, aliased {m['alias'] / GiB:.2f}, "
          f"temporaries {m['temp'] / GiB:.2f} GiB")
    f = r["flops"]
    ratio = f"{r['recompute_ratio']:.2f}" if r["recompute_ratio"] else "-"
    print(f"FLOPs per device per step: executed {f['executed'] / 1e12:.1f} T "
          f"({', '.join(f'{k} {v / 1e12:.1f} T' for k, v in sorted(f['by_kind'].items()))}), model "
          f"{f['model'] / 1e12:.1f} T, executed/model {ratio}")
    print("collectives per device per step:")
    for kind, v in sorted(r["collectives"].items()):
        print(f"  {kind:<20} {v['count']:>7} x, {v['bytes'] / 1e9:9.2f} GB sent ({v['cross_host_bytes'] / 1e9:.2f} GB "
              "across hosts)")
    print("custom calls:", ", ".join(f"{k} {v}" for k, v in sorted(r["custom_calls"].items())) or "none")
    b = r["bound"]
    print(f"roofline bound: {b['step_s']:.3f} s/step (compute {b['compute_s']:.3f}, kernel HBM {b['hbm_s']:.3f}, "
          f"collectives {b['comm_s']:.3f}), {b['clips_per_s']:.2f} clips/s, {b['tokens_per_s']:.0f} LLM tokens/s "
          f"per device; collectives hide under compute at 60% of peak: {b['comm_hidden_at_60pct']}")


def main(argv) -> int:
    path, preset, overrides, rest = split_config_args(argv)
    a = parser().parse_args(rest)
    try:
        topology = Topology.parse(a.topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    target = TARGETS[a.target]
    run = resolve_for_compile(load_config_file(path, preset, overrides))
    devices = target_devices(target, topology)
    compiled = compile_step(run, devices, num_hosts=topology.num_hosts)
    r = report(compiled, target, topology, with_model_flops=a.model_flops)
    r.update(commit=commit(), machine=machine())
    print_report(r)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    if not r["fits"]:
        print(f"error: the {r['stage']} step needs {r['memory']['total'] / GiB:.1f} GiB per device but a "
              f"{target.name} leaves {r['usable_bytes'] / GiB:.1f} GiB to it; lower per_device_batch, use "
              "sharding.frozen=fsdp or a stronger remat policy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_config_cli(parser, main)
