"""Attribute a profiled jitted step's time to model components.

The trace (`jax.profiler.trace(..., create_perfetto_trace=True)`) holds one event per executed HLO op
(named after the instruction, or carrying it as `hlo_op`); the compiled module's text maps instruction names
to their `op_name` metadata, which carries the JAX name stack: Flax module paths (`ego_encoder`,
`mapper_f`, `connector`, `llm`, ...) and the named scopes `losses` and `optimizer`.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

from exo2ego_jax.bench.parts import LABELS, OTHER, PARTS, part_of


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> op_name metadata, from compiled HLO text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]+)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def load_trace_events(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: the profiler wrote no trace")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def _hlo_name(event: dict) -> str:
    return (event.get("args") or {}).get("hlo_op") or event.get("name", "")


def exclusive_durations(events: list[dict]):
    """(event, duration minus its nested events' durations) per event: a `while` (scan over layers) contains
    its body's ops on the same thread, which would otherwise count twice."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e.get("ts", 0.0), -e.get("dur", 0.0)))
        stack: list[list] = []  # [event, end, child time]
        for e in thread_events:
            start, dur = e.get("ts", 0.0), e.get("dur", 0.0)
            while stack and start >= stack[-1][1]:
                done = stack.pop()
                out.append((done[0], done[0].get("dur", 0.0) - done[2]))
            if stack:
                stack[-1][2] += dur
            stack.append([e, start + dur, 0.0])
        out.extend((d[0], d[0].get("dur", 0.0) - d[2]) for d in stack)
    return out


def attribute(events: list[dict], op_names: dict[str, str], *, steps: int, step_time_s: float, top: int = 10):
    """Per-component seconds per step (parts + 'other' sum to the step time) and the top ops by time."""
    per_op = collections.Counter()
    for e, exclusive_us in exclusive_durations([e for e in events if _hlo_name(e) in op_names]):
        per_op[_hlo_name(e)] += exclusive_us * 1e-6 / steps  # us -> s, per step
    parts = collections.Counter()
    for name, seconds in per_op.items():
        parts[part_of(op_names[name])] += seconds
    measured = sum(parts.values())
    if measured > step_time_s:  # ops overlapped (multi-threaded CPU runtime, GPU streams): scale to the step
        parts = collections.Counter({k: v * step_time_s / measured for k, v in parts.items()})
        measured = step_time_s
    parts[OTHER] += step_time_s - measured
    rows = [dict(part=part, component=LABELS[part], seconds=parts.get(part, 0.0),
                 share=parts.get(part, 0.0) / step_time_s) for part in [p for p, _, _ in PARTS] + [OTHER]]
    top_ops = [dict(op=name, op_name=op_names[name], seconds=s, component=LABELS[part_of(op_names[name])])
               for name, s in per_op.most_common(top)]
    return rows, top_ops
