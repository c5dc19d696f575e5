"""Timing jitted steps honestly: compile separately, warm up, block on results, report the median."""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any
from collections.abc import Callable

import jax

from exo2ego_jax.bench.targets import TARGETS


@dataclasses.dataclass
class StepTiming:
    compile_s: float
    step_s: float           # median over `reps`
    step_s_min: float
    flops_xla: float | None  # from compiled.cost_analysis(): what XLA actually runs (recompute included)
    temp_bytes: int | None   # compiled.memory_analysis() temporaries
    peak_bytes: int | None   # device peak after the run, where the backend reports it
    hlo_text: str = ""       # the compiled program (for the per-kernel estimate beside the measurement)


def time_step(fn: Callable, *args, reps: int = 5, warmup: int = 2, donate_first: bool = False) -> tuple[StepTiming, Any]:
    """Compile `fn` (already jitted) for `args`, run `warmup` + `reps` steps, return timing and last output.

    With `donate_first`, `fn` must return a new first argument (a train state) that is fed back each step.
    """
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = _first(compiled.cost_analysis())
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None

    out = None
    times = []
    for i in range(warmup + reps):
        t = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if donate_first:
            args = (out[0],) + tuple(args[1:])
    return StepTiming(compile_s, statistics.median(times), min(times), flops, temp, peak_device_bytes(),
                      compiled.as_text()), out


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _first(cost):
    if isinstance(cost, (list, tuple)):
        return cost[0] if cost else None
    return cost


def emit(record: dict, path: str | None) -> None:
    print(json.dumps(record), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format). Missing values print as '-'."""
    header = " | ".join(h for _, h, _ in columns)
    print("| " + header + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        print("| " + " | ".join(cells) + " |")


def datasheet_peak_flops() -> float | None:
    """Dense bf16 FLOP/s of this process's GPU from its datasheet (H100/H200); None elsewhere (no MFU)."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    for model in ("H100", "H200"):
        if model in kind:
            return TARGETS[model.lower()].peak_flops
    return None


def device_kind() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


def this_device_target():
    """The datasheet target of this process's device (H100/H200), else the nominal CPU figures."""
    kind = device_kind()
    return next((TARGETS[m.lower()] for m in ("H100", "H200") if m in kind), TARGETS["cpu"])
