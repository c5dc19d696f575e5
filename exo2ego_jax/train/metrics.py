"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files
(tensorboardX, so no TensorFlow is needed where training runs).

A resumed run logs each step once: rows past the restored step are dropped from metrics.jsonl, and the
TensorBoard writer opens with `purge_step`, which tells TensorBoard to discard the earlier run's events from
that step on.
"""
from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the rows of `path` with step <= last_step (a resume replays the rest); returns rows dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                dropped += 1
                continue
            if row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Writes each logged step to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        path = os.path.join(workdir, METRICS_FILE)
        truncate_metrics(path, resume_step or 0)
        self._jsonl = open(path, "a")  # noqa: SIM115 (appended to for the whole run; closed in close())
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=(resume_step or 0) + 1,
                                 flush_secs=10)

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
