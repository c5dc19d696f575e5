"""Compile a stage's train step for a GPU pod, a Cloud TPU slice (or N fake CPU devices) on this machine, and
report whether it fits.

  python launch/aot_compile.py --config configs/stage3.py:7b --target h100 --topology 1x1x8 [--json FILE]
  python launch/aot_compile.py --config configs/stage3.py:7b --target v5p-64 [--topology 2x8x4]
                               [--config.per_device_batch=1 --config.sharding.frozen=replicated ...]

  --target   h100 (80 GB), h200 (141 GB): XLA's compiler for sm_90a, no GPU needed (`pip install -e '.[aot]'`);
             v4, v5e, v5p, v6e, or a Cloud TPU slice name (v5p-64 = 32 chips, v6e-64, v5e-256; v4-N and v5p-N
             count TensorCores): libtpu's compiler, no TPU needed (`pip install -e '.[tpu]'`);
             cpu: N fake CPU devices (the logic on any machine).
  --topology SxHxG: S slices x H hosts x G devices (chips) per host (1x2x8 = two 8-GPU hosts; 2x8x4 with
             v5p-64 = two 32-chip slices). Optional with a slice name; 1x1x8 for GPUs by default.

The step is built by the same code `launch/stageN.py` runs, from abstract shapes only (no weights, no
checkpoint; the architecture is the config's model section), resolved for the target's hardware as a run on it
would be (attention 'auto', the preset's `hardware` settings), on a mesh of the topology's devices, at the
widest text bucket. Prints a table and writes JSON: target {name, platform, generation, ...}, fits (the total
within usable_bytes: 90% of a GPU's memory, the share the training CLI lets JAX take, or a TPU chip's HBM as
its compiler enforces it), hbm_bytes, usable_bytes, memory {argument, output, alias, temp, total[, peak]}
(bytes per device), flops {executed, model} (per device per step), collectives {kind: {count, bytes,
cross_host_bytes}} (cross_host: the slow link, across hosts on GPUs and across slices on TPUs), collective_bytes
{fast link, slow link}, custom_calls {target: count}, bound {step_s, clips_per_s, tokens_per_s}. A step past
the device's memory exits 1 with a one-line "does not fit" naming the GiB required and available (a TPU
compiler's refusal is reported the same way, with `out_of_memory` in the JSON).
"""
from __future__ import annotations

import gzip
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.bench.environment import prepare_from_argv

prepare_from_argv("h100")  # before JAX starts

import argparse

from exo2ego_jax.bench.aot import compile_step, report, target_devices
from exo2ego_jax.bench.estimate import PART_COLUMNS, part_rows
from exo2ego_jax.bench.serving import PROGRAMS, ServingShapes, compile_program, report_program
from exo2ego_jax.bench.targets import TARGETS, parse_target
from exo2ego_jax.bench.timing import print_table
from exo2ego_jax.configfile import load_config_file, split_config_args
from exo2ego_jax.errors import ConfigError, run_config_cli
from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.train.config import resolve_for_compile
from exo2ego_jax.train.hardware import hardware_of
from exo2ego_jax.paths import absolute


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/aot_compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE:PRESET", help="a stage config, e.g. configs/stage3.py:7b")
    p.add_argument("--target", default="h100",
                   help=f"the device to compile for: {', '.join(sorted(TARGETS))}, or a TPU slice like v5p-64")
    p.add_argument("--topology", help="SxHxG: slices x hosts x devices per host (GPUs: 1x1x8 by default)")
    p.add_argument("--json", type=absolute, help="write the report here")
    p.add_argument("--program", choices=PROGRAMS, default="train",
                   help="train: the stage's step; prefill, decode, score: the serving programs of the stage's model")
    p.add_argument("--batch", type=int, help="sequences (prefill, decode; default 1) or scored rows (score; default "
                                            "16, the evaluation's chunk)")
    p.add_argument("--prompt_tokens", type=int, default=64, help="serving: text tokens around the clip")
    p.add_argument("--new_tokens", type=int, default=256, help="serving: KV-cache room for the answer")
    p.add_argument("--hlo", type=absolute, help="also write the optimized HLO module here (.gz: gzipped), for "
                                               "reading it again without compiling")
    p.add_argument("--model_flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count the model's useful FLOPs (lowers each module once more)")
    return p


GiB = 2 ** 30


def print_report(r: dict) -> None:
    t = r["target"]
    head = (f"{r['stage']} {r['preset']} on {r['topology']} x {t['name']}: mesh {r['mesh']}, batch {r['batch_size']} "
            f"= {r['microbatches']} microbatches x {r['per_device_batch']} per device, text {r['text_width']}, "
            f"attention {r['attention']}, frozen {r['frozen_layout']}, remat {r['remat']['llm']}/{r['remat']['clip']}"
            f"{', scanned layers' if r['scan_layers'] else ''}; compiled in {r['compile_s']:.0f} s")
    print(head)
    if r.get("out_of_memory"):
        print(f"the compiler refused it: {r['out_of_memory']['message']}")
        return
    m = r["memory"]
    print(f"memory per device: {m['total'] / GiB:.2f} GiB of {r['usable_bytes'] / GiB:.2f} usable "
          f"({100 * r['headroom']:.0f}% free; the device has {r['hbm_bytes'] / GiB:.2f}): arguments "
          f"{m['argument'] / GiB:.2f}, outputs {m['output'] / GiB:.2f}, aliased {m['alias'] / GiB:.2f}, "
          f"temporaries {m['temp'] / GiB:.2f} GiB")
    f = r["flops"]
    ratio = f"{r['recompute_ratio']:.2f}" if r["recompute_ratio"] else "-"
    print(f"FLOPs per device per step: executed {f['executed'] / 1e12:.1f} T "
          f"({', '.join(f'{k} {v / 1e12:.1f} T' for k, v in sorted(f['by_kind'].items()))}), model "
          f"{f['model'] / 1e12:.1f} T, executed/model {ratio}")
    fast, slow = t["fast_link"], t["slow_link"]
    print(f"collectives per device per step ({fast} / {slow}):")
    for kind, v in sorted(r["collectives"].items()):
        print(f"  {kind:<20} {v['count']:>7} x, {v['bytes'] / 1e9:9.2f} GB sent ({v['cross_host_bytes'] / 1e9:.2f} GB "
              f"over {slow})")
    print("custom calls:", ", ".join(f"{k} {v}" for k, v in sorted(r["custom_calls"].items())) or "none")
    b = r["bound"]
    print(f"roofline bound: {b['step_s']:.3f} s/step (compute {b['compute_s']:.3f}, kernel HBM {b['hbm_s']:.3f}, "
          f"collectives {b['comm_s']:.3f}), {b['clips_per_s']:.2f} clips/s, {b['tokens_per_s']:.0f} LLM tokens/s "
          f"per device; collectives hide under compute at 60% of peak: {b['comm_hidden_at_60pct']}")
    print_estimate(r)


def print_estimate(r: dict) -> None:
    e, b = r["estimate"], r["bound"]
    mfu = f"{100 * e['mfu']:.1f}%" if e["mfu"] else "-"
    print(f"per-kernel estimate: {e['step_s']:.3f} s/step (bound {b['step_s']:.3f}), MFU {mfu}; kernels "
          f"{e['compute_s']:.3f} s of which memory-bound {e['memory_bound_s']:.3f} s, launch gaps {e['launch_s']:.3f} s; "
          f"collectives {e['collectives_s']:.3f} s of which exposed {e['exposed_collectives_s']:.3f} s; "
          f"{e['clips_per_s']:.2f} clips/s ({e['kernels']} kernels, {e['kernel_runs']} runs per step)")
    print_table(part_rows(e["by_part"], e["step_s"]), PART_COLUMNS)


def does_not_fit(r: dict) -> str:
    """The one-line reason a step does not fit."""
    t = r["target"]
    oom = r.get("out_of_memory")
    if oom:
        need = f"{oom['required_bytes'] / GiB:.2f} GiB" if oom["required_bytes"] else "more memory"
        have = oom["available_bytes"] or r["usable_bytes"]
        what = " for temporaries" if "temporaries" in oom["message"] else ""
        return (f"{r['stage']} {r['preset']} does not fit on {r['topology']} x {t['name']}: the compiler needs {need}"
                f"{what} per chip but {have / GiB:.2f} GiB are available; lower per_device_batch, use "
                "sharding.frozen=fsdp, a stronger remat policy or more chips")
    return (f"{r['stage']} {r['preset']} does not fit on {r['topology']} x {t['name']}: it needs "
            f"{r['memory']['total'] / GiB:.2f} GiB per device but {r['usable_bytes'] / GiB:.2f} GiB are available; "
            "lower per_device_batch, use sharding.frozen=fsdp, a stronger remat policy or more devices")


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)


def serve_program(a, run, devices, target, topology) -> int:
    shapes = ServingShapes(batch=a.batch or (16 if a.program == "score" else 1), prompt_tokens=a.prompt_tokens,
                           new_tokens=a.new_tokens)
    program = compile_program(run, devices, a.program, shapes)
    r = report_program(program, run, target, topology, shapes)
    r.update(commit=commit(), machine=machine())
    if a.hlo and program.executable is not None:
        write_text(a.hlo, program.executable.as_text())
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    t = r["target"]
    print(f"{r['program']} of the {r['stage']} {r['preset']} model on {r['topology']} x {t['name']}: batch {r['batch']}, "
          f"prompt {r['prompt_tokens']} tokens, KV cache {r['cache_length']} slots "
          f"({r['kv_cache_bytes'] / GiB:.2f} GiB per device), weights {r['weight_bytes'] / GiB:.2f} GiB per device, "
          f"attention {r['attention']}; compiled in {r['compile_s']:.0f} s")
    if not r["fits"]:
        print(f"error: {r['program']} does not fit on {r['topology']} x {t['name']}: "
              f"{(r.get('out_of_memory') or {}).get('message', 'past the device memory')}", file=sys.stderr)
        return 1
    m, e = r["memory"], r["estimate"]
    print(f"memory per device: {m['total'] / GiB:.2f} GiB of {r['usable_bytes'] / GiB:.2f} usable "
          f"({100 * r['headroom']:.0f}% free)")
    print(f"per-kernel estimate: {e['step_s'] * 1e3:.2f} ms per run, {e['tokens_per_s']:.0f} tokens/s, MFU "
          f"{100 * (e['mfu'] or 0):.1f}%; memory-bound kernels {e['memory_bound_s'] * 1e3:.2f} ms, launch gaps "
          f"{e['launch_s'] * 1e3:.2f} ms ({e['kernel_runs']} kernel runs)")
    if "weight_read_bound" in r:
        w = r["weight_read_bound"]
        print(f"reading the weights once per step at the datasheet bandwidth: {w['step_s'] * 1e3:.2f} ms, "
              f"{w['tokens_per_s']:.0f} tokens/s; the estimate is {1 / w['estimate_share']:.2f}x that time")
    print_table(part_rows(e["by_part"], e["step_s"]), PART_COLUMNS)
    return 0


def main(argv) -> int:
    path, preset, overrides, rest = split_config_args(argv)
    a = parser().parse_args(rest)
    try:
        target, topology = parse_target(a.target, a.topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    devices = target_devices(target, topology)
    run = resolve_for_compile(load_config_file(path, preset, overrides), hardware_of(devices[0]), set(overrides))
    if a.program != "train":
        return serve_program(a, run, devices, target, topology)
    compiled = compile_step(run, devices, num_hosts=topology.num_hosts)
    r = report(compiled, target, topology, with_model_flops=a.model_flops)
    if a.hlo and compiled.executable is not None:
        write_text(a.hlo, compiled.executable.as_text())
    r.update(commit=commit(), machine=machine())
    print_report(r)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    if not r["fits"]:
        print(f"error: {does_not_fit(r)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_config_cli(parser, main)
