"""The stage chain (init -> stage 1 -> stage 2 -> stage 3) and running one stage exactly as a user does:
`python launch/stageN.py --config configs/stageN.py:PRESET --workdir DIR --config.key=value ...`.

Used by the study (exo2ego_jax/study) and launch/pipeline.py. The stage scripts and configs live in the
repository's launch/ and configs/ folders (a source checkout, as `pip install -e .` keeps it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE_FILES = ("stage0", "stage1", "stage2", "stage3")  # launch/<file>.py and configs/<file>.py


def config_path(stage_file: str) -> str:
    return os.path.join(ROOT, "configs", f"{stage_file}.py")


def after(previous_workdir: str | None) -> dict:
    """The overrides that start a stage from the previous stage's export."""
    return {"init.from_workdir": previous_workdir} if previous_workdir else {}


def stage_command(stage_file: str, preset: str, workdir: str, overrides: dict) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "launch", f"{stage_file}.py"), "--config",
           f"{config_path(stage_file)}:{preset}", "--workdir", workdir]
    return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def run_stage(stage_file: str, preset: str, workdir: str, overrides: dict, log_path: str, *,
              echo: bool = True, env: dict | None = None) -> float:
    """Run one stage as a subprocess; its output goes to `log_path` (and the terminal with `echo`).
    Returns the seconds it took; a failed stage raises SystemExit with the log's tail."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **(env or {})}
    started = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(stage_command(stage_file, preset, workdir, overrides), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
        while chunk := proc.stdout.read1(4096):
            log.write(chunk)
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        proc.wait()
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{stage_file} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return time.time() - started
