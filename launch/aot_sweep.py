"""Compile every 7b stage for GPU pods and TPU slices on this machine and tabulate the figures
(launch/BENCHMARKS.md's tables).

  python launch/aot_sweep.py --out /tmp/aot_sweep [--only s3_h100_1x1x8,...] [--kind tpu] [--list]

Each entry is one `launch/aot_compile.py` run in its own process (minutes each on 2 cores; about an hour for
each kind). `presets`: every stage's 7b preset on one 8-GPU H100 and H200 host, stage 3 also on two and four
hosts. `choices`: one stage with one preset choice undone, for the before/after of each choice. `tpu`: every
stage's 7b preset on v5p-64 (32 chips) and v6e-64, stage 3 also on v5e-256, on two v5p-64 slices and on v5e-8
(to say whether it fits there at all). `serving`: the stage-3 model's prefill, decode (batch 1 and 32) and
option-scoring programs on one H100. A rerun skips entries whose JSON exists. Writes OUT/<entry>.json,
OUT/<entry>.log, OUT/<entry>.hlo.gz (the optimized module) and OUT/table.md (with the commit and machine);
exits 1 if a preset entry does not fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.provenance import commit, machine
from exo2ego_jax.paths import absolute

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    stage_file: str
    target: str
    topology: str
    overrides: tuple[str, ...] = ()
    kind: str = "presets"   # or "choices"
    note: str = ""


ENTRIES = [
    *(Entry(f"s{i}_{t}_1x1x8", f"stage{i}", t, "1x1x8") for t in ("h100", "h200") for i in range(4)),
    Entry("s3_h100_1x2x8", "stage3", "h100", "1x2x8"),
    Entry("s3_h100_1x4x8", "stage3", "h100", "1x4x8"),
    Entry("s3_frozen_fsdp", "stage3", "h100", "1x1x8", ("--config.sharding.frozen=fsdp",), "choices",
          "frozen params sharded like the trainable ones"),
    Entry("s3_pdb2", "stage3", "h100", "1x1x8", ("--config.per_device_batch=2",), "choices",
          "2 clips per GPU per microbatch"),
    Entry("s3_llm_remat_none", "stage3", "h100", "1x1x8", ("--config.model.remat_policy=none",), "choices",
          "no LLM rematerialisation"),
    Entry("s3_clip_remat_dots", "stage3", "h100", "1x1x8", ("--config.model.clip_remat_policy=dots_no_batch",),
          "choices", "CLIP saves its matmul outputs instead of full remat"),
    Entry("s0_pdb4", "stage0", "h100", "1x1x8", ("--config.per_device_batch=4",), "choices",
          "4 clips per GPU per microbatch"),
    Entry("s1_pdb4", "stage1", "h100", "1x1x8", ("--config.per_device_batch=4",), "choices",
          "4 clips per GPU per microbatch"),
    Entry("s2_frozen_fsdp", "stage2", "h100", "1x1x8", ("--config.sharding.frozen=fsdp",), "choices",
          "frozen params sharded like the trainable ones"),
    Entry("s2_pdb4", "stage2", "h100", "1x1x8", ("--config.per_device_batch=4",), "choices",
          "4 clips per GPU per microbatch"),
    *(Entry(f"s{i}_{t}", f"stage{i}", t, "", kind="tpu") for t in ("v5p-64", "v6e-64") for i in range(4)),
    Entry("s3_v5e-256", "stage3", "v5e-256", "", kind="tpu"),
    Entry("s3_2x_v5p-64", "stage3", "v5p-64", "2x8x4", kind="tpu", note="two slices over DCN"),
    Entry("s3_v5e-8", "stage3", "v5e-8", "", kind="tpu_limits", note="the preset on one v5e host"),
    Entry("s3_v5e-8_pdb8", "stage3", "v5e", "1x1x8", ("--config.per_device_batch=8",), "tpu_limits",
          "8 clips per chip: past a v5e chip's HBM"),
]
ENTRIES += [
    *(Entry(f"s{i}_v6e-64_tp4", f"stage{i}", "v6e-64", "", ("--config.mesh.shape=(1,-1,4)",
                                                            "--config.per_device_batch=2"), "tpu_choices",
            "4-way tensor parallelism, 2 clips per row (stage 3's v6e setting)") for i in (0, 1, 2)),
    Entry("s3_v5e-256_tp4", "stage3", "v5e-256", "", ("--config.mesh.shape=(1,-1,4)",), "tpu_choices",
          "4-way tensor parallelism (v6e's stage-3 setting)"),
    Entry("prefill_h100", "stage3", "h100", "1x1x1", ("--program", "prefill"), "serving",
          "one clip (x and F(x): 3,042 visual tokens) + 64 prompt tokens"),
    Entry("decode_b1_h100", "stage3", "h100", "1x1x1", ("--program", "decode", "--batch", "1"), "serving",
          "one token at batch 1 against a 3,362-slot cache"),
    Entry("decode_b32_h100", "stage3", "h100", "1x1x1", ("--program", "decode", "--batch", "32"), "serving",
          "one token at batch 32"),
    Entry("score_h100", "stage3", "h100", "1x1x1", ("--program", "score"), "serving",
          "16 (clip, prompt + option) rows: the evaluation's chunk"),
]
TPU_KINDS = ("tpu", "tpu_limits", "tpu_choices")


def run_entry(e: Entry, out: str) -> dict | None:
    path = os.path.join(out, f"{e.name}.json")
    if not os.path.exists(path):
        cmd = [sys.executable, os.path.join(ROOT, "launch", "aot_compile.py"), "--config",
               os.path.join(ROOT, "configs", f"{e.stage_file}.py") + ":7b", "--target", e.target,
               *(("--topology", e.topology) if e.topology else ()), "--json", path,
               "--hlo", os.path.join(out, f"{e.name}.hlo.gz"), *e.overrides]
        started = time.time()
        with open(os.path.join(out, f"{e.name}.log"), "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        print(f"{e.name}: exit {proc.returncode} in {time.time() - started:.0f} s", flush=True)
        if not os.path.exists(path):
            return None
    with open(path) as f:
        return json.load(f)


def reestimate(e: Entry, out: str, r: dict | None) -> dict | None:
    """Recompute an entry's per-kernel estimate from its saved module with this commit's estimator (no compile);
    the JSON records the commit the estimate came from as `estimate_commit`."""
    path = os.path.join(out, f"{e.name}.hlo.gz")
    if r is None or not r.get("fits") or not os.path.exists(path):
        return r
    from exo2ego_jax.bench.estimate import estimate
    from exo2ego_jax.bench.targets import parse_target
    target, topology = parse_target(e.target, e.topology or None)
    with gzip.open(path, "rt") as f:
        text = f.read()
    n = r["devices"]
    per_host = n // topology.slices if target.platform == "tpu" else topology.per_host
    useful = r["flops"]["model"]
    est = estimate(text, target, num_devices=n, useful_flops=useful, host_of=lambda i: i // per_host,
                   num_slices=topology.slices)
    keep = ("step_s", "mfu", "exposed_collectives_s", "compute_s", "memory_bound_s", "collectives_s", "launch_s",
            "kernels", "kernel_runs", "by_part", "assumptions")
    r["estimate"] = {k: est[k] for k in keep}
    step = est["step_s"]
    if "program" in r:
        r["estimate"]["tokens_per_s"] = r["tokens"] / step
        if "weight_read_bound" in r:
            r["weight_read_bound"]["estimate_share"] = r["weight_read_bound"]["step_s"] / step
    else:
        r["estimate"]["clips_per_s"] = r["batch_size"] / step
        r["estimate"]["tokens_per_s"] = r["llm_tokens_per_step"] / n / step
    r["estimate_commit"] = commit()
    with open(os.path.join(out, f"{e.name}.json"), "w") as f:
        json.dump(r, f, indent=1, default=str)
    return r


def tpu_row(e: Entry, r: dict | None) -> str:
    note = f"{e.note} | " if e.kind == "tpu_choices" else ""
    first = f"| {e.name} | {note}{e.stage_file} | {e.target} {e.topology or ''}".rstrip() + " | "
    if r is None:
        return first + f"failed (see {e.name}.log) |" + " |" * 10
    if r.get("out_of_memory"):
        oom = r["out_of_memory"]
        need = f"{oom['required_bytes'] / GiB:.1f}" if oom["required_bytes"] else "?"
        return (first + f"{r['per_device_batch']} x {r['microbatches']} | does not fit: the compiler needs {need} "
                f"of {(oom['available_bytes'] or r['hbm_bytes']) / GiB:.2f} GiB |" + " |" * 8
                + f" {r.get('commit', 'not recorded')} |")
    links = r.get("collective_bytes", {})
    b = r["bound"]
    per_chip = b["clips_per_s"] / r["devices"]
    return (first + f"{r['per_device_batch']} x {r['microbatches']} | {r['memory']['total'] / GiB:.1f} / "
            f"{r['usable_bytes'] / GiB:.2f} | {100 * r['headroom']:.0f}% | {r['recompute_ratio']:.2f} | "
            f"{links.get('ICI', 0) / 1e9:.1f} / {links.get('DCN', 0) / 1e9:.2f} | "
            f"{b['comm_s']:.3f} / {b['compute_s']:.3f} | {b['clips_per_s']:.1f} / {per_chip:.2f} | "
            f"{estimated(r).split(' | ')[0]} | {r['compile_s']:.0f} | {r.get('commit', 'not recorded')} |")


def serving_row(e: Entry, r: dict | None) -> str:
    first = f"| {e.name} | {e.note} | "
    if r is None or not r.get("fits"):
        return first + ("failed" if r is None else "does not fit") + f" (see {e.name}.log) |" + " |" * 7
    est = r["estimate"]
    bound = r.get("weight_read_bound")
    versus = f"{bound['tokens_per_s']:.0f} ({100 * bound['estimate_share']:.0f}%)" if bound else "-"
    kv = "-" if r["program"] == "score" else f"{r['kv_cache_bytes'] / GiB:.2f}"  # scoring keeps no KV cache
    return (first + f"{r['memory']['total'] / GiB:.1f} | {kv} | "
            f"{est['step_s'] * 1e3:.2f} | {est['tokens_per_s']:.0f} | {versus} | "
            f"{est['memory_bound_s'] / est['step_s']:.0%} | {est['launch_s'] * 1e3:.2f} | "
            f"{r.get('commit', 'not recorded')} |")


def row(e: Entry, r: dict | None) -> str:
    if e.kind in TPU_KINDS:
        return tpu_row(e, r)
    if e.kind == "serving":
        return serving_row(e, r)
    first = f"| {e.name} | " + (f"{e.note} | " if e.kind == "choices" else "")
    if r is None:
        return first + f"{e.stage_file} | {e.target} {e.topology} | failed (see {e.name}.log) |" + " |" * 10
    collective_gb = sum(v["bytes"] for v in r["collectives"].values()) / 1e9
    b = r["bound"]
    return (first + f"{r['stage']} | {e.target} {e.topology} | {r['per_device_batch']} x {r['microbatches']} | "
            f"{r['memory']['total'] / GiB:.1f} / {r['usable_bytes'] / GiB:.1f} | {100 * r['headroom']:.0f}% | "
            f"{r['recompute_ratio']:.2f} | {collective_gb:.1f} | {b['comm_s']:.3f} / {b['compute_s']:.3f} | "
            f"{b['clips_per_s']:.1f} | {estimated(r)} | {r['compile_s']:.0f} | {r.get('commit', 'not recorded')} |")


def estimated(r: dict) -> str:
    e = r.get("estimate")
    if not e:
        return "- | -"
    return (f"{e['step_s']:.2f} ({100 * (e['mfu'] or 0):.0f}%) | {e['memory_bound_s']:.2f} / "
            f"{e['exposed_collectives_s']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/aot_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=absolute, required=True, help="folder for the reports (reused: finished entries are kept)")
    p.add_argument("--only", default="", help="comma-separated entry names")
    p.add_argument("--list", action="store_true", help="print the entries and exit")
    p.add_argument("--reestimate", action="store_true",
                   help="recompute finished entries' estimates from their saved modules with this commit's code")
    p.add_argument("--kind", choices=("presets", "choices", "tpu", "serving", "gpu"),
                   help="only these entries (gpu: presets and choices)")
    a = p.parse_args(argv)
    entries = ENTRIES
    if a.kind:
        kinds = {"gpu": ("presets", "choices"), "tpu": TPU_KINDS}.get(a.kind, (a.kind,))
        entries = [e for e in entries if e.kind in kinds]
    if a.only:
        names = a.only.split(",")
        unknown = sorted(set(names) - {e.name for e in ENTRIES})
        if unknown:
            p.error(f"--only: unknown entries {unknown}; see --list")
        entries = [e for e in ENTRIES if e.name in names]
    if a.list:
        for e in entries:
            print(f"{e.name:<22} {e.kind:<8} {e.stage_file} {e.target} {e.topology} {' '.join(e.overrides)}")
        return 0
    os.makedirs(a.out, exist_ok=True)
    results = {e.name: run_entry(e, a.out) for e in entries}
    if a.reestimate:
        results = {e.name: reestimate(e, a.out, results[e.name]) for e in entries}
    columns = ("stage | target | clips per GPU x microbatches | GiB per GPU (of usable) | headroom | "
               "executed / model FLOPs | collective GB per GPU per step | collectives / compute s at peak | "
               "bound clips/s | estimated s/step (MFU) | memory-bound / exposed collectives s | compile s | "
               "compiled at commit |")
    serving_columns = ("GiB on the GPU | KV cache GiB | estimated ms per run | estimated tokens/s | weight-read "
                       "bound tokens/s (its share of the estimate) | memory-bound share | launch gaps ms | "
                       "compiled at commit |")
    # entries kept from earlier runs may come from other commits: each row names its own
    lines = [f"Table written at commit {commit()} on {machine()}, {time.strftime('%Y-%m-%d')}.", ""]
    tpu_columns = ("stage | slice | clips per chip x microbatches | GiB per chip (of HBM) | headroom | "
                   "executed / model FLOPs | collective GB per chip per step (ICI / DCN) | collectives / compute s "
                   "at peak | bound clips/s per slice / per chip | estimated s/step (MFU) | compile s | "
                   "compiled at commit |")
    for kind, title in (("presets", "The 7b presets"), ("choices", "One preset choice undone (H100, 1x1x8)"),
                        ("tpu", "The 7b presets on Cloud TPU slices"),
                        ("tpu_limits", "Stage 3 on one v5e host"),
                        ("tpu_choices", "One TPU preset choice undone"),
                        ("serving", "Serving the stage-3 model on one H100")):
        chosen = [e for e in entries if e.kind == kind]
        if chosen:
            head = "| entry | " + ("change from the preset | " if kind in ("choices", "tpu_choices") else "") + (
                tpu_columns if kind in TPU_KINDS else "program | " + serving_columns if kind == "serving"
                else columns)
            lines += [f"### {title}", "", head, "|---" * (head.count(" | ") + 1) + "|"]
            lines += [row(e, results[e.name]) for e in chosen] + [""]
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    bad = [e.name for e in entries if e.kind in ("presets", "tpu") and not (results[e.name] or {}).get("fits")]
    if bad:
        print(f"error: preset entries that do not fit or failed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
