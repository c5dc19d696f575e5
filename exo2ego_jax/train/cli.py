"""The command line of launch/stage0.py ... stage3.py.

  python launch/stage3.py --config configs/stage3.py:7b --workdir /workdirs/stage3 [--config.FIELD=VALUE ...]
  multi-host: add --distributed (cluster environment: SLURM, Open MPI, Kubernetes) or
  --coordinator_address HOST:PORT --num_processes N --process_id I
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys

import jax

from exo2ego_jax import device_memory
from exo2ego_jax.configfile import load_config_file, split_config_args
from exo2ego_jax.errors import ConfigError, run_cli
from exo2ego_jax.train.checkpointing import (WorkerErrorFilter, drop_closed_loop_callbacks,
                                               last_checkpoint_note)
from exo2ego_jax.train.loop import train
from exo2ego_jax.paths import absolute

EXAMPLES = """\
config overrides (any field of the config file, typed by the field; see configs/base.py):
  --config.batch_size=128  --config.per_device_batch=2  --config.optim.learning_rate=1e-5
  --config.mesh.shape='(1,-1,1)'  --config.init.from_workdir=/workdirs/stage2  --config.lora.enabled=False
  --config.sharding.frozen=fsdp  --config.data.root=/data/records  --config.force_new_config=True

A user mistake (bad config value, missing file, busy workdir) prints one `error:` line and exits 2; set
EXO2EGO_DEBUG=1 to see its traceback.
"""


def parser(stage_file: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python launch/{stage_file}.py", epilog=EXAMPLES,
                                description=f"Train one Exo2Ego stage (configs/{stage_file}.py): resumes the "
                                            "workdir's latest checkpoint, exports WORKDIR/export at the end.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE:PRESET", help=f"config file and preset, e.g. configs/{stage_file}.py:7b "
                                                           "(presets: tiny, demo, 7b)")
    p.add_argument("--workdir", type=absolute, required=True,
                   help="checkpoints, metrics.jsonl, TensorBoard and the export go here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    p.add_argument("--noprogress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the cluster environment (SLURM, Open MPI, Kubernetes, "
                        "Cloud TPU)")
    p.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's address for jax.distributed")
    p.add_argument("--num_processes", type=int, help="number of processes (with --coordinator_address)")
    p.add_argument("--process_id", type=int, help="this process's index (with --coordinator_address)")
    return p


def init_distributed(a) -> None:
    """Start jax.distributed once, in the main process only (Grain workers re-run module init: grain#802)."""
    if multiprocessing.parent_process() is not None:
        return
    explicit = a.coordinator_address is not None
    if not (explicit or a.distributed):
        return
    if "cpu" in (jax.config.jax_platforms or "") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if a.num_processes is None or a.process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(a.coordinator_address, a.num_processes, a.process_id)
    else:
        jax.distributed.initialize()


class Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, `kill`): unwinds the training loop so its cleanup runs."""


def _terminate(signum, frame):
    raise Terminated()


def main(stage_file: str, default_config: str, argv: list[str]) -> int:
    path, preset, overrides, rest = split_config_args(argv, default=default_config)
    a = parser(stage_file).parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # absl's and asyncio's records reach the root's handlers
        handler.addFilter(WorkerErrorFilter())
    drop_closed_loop_callbacks()
    # On GPUs JAX grabs 75% of the memory by default; the train step needs most of it (the figures of
    # launch/aot_compile.py are against the whole device).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    c = load_config_file(path, preset, overrides)
    init_distributed(a)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = train(c, a.workdir, show_progress=a.progress, explicit=set(overrides))
    except Terminated:  # the loop's cleanup ran on the way out: pending checkpoint writes finished
        print(f"stopped by SIGTERM; relaunch the same command to resume from the last complete checkpoint"
              f"{last_checkpoint_note(a.workdir)}", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    if result.metrics:
        last = next((m for m in reversed(result.metrics) if "loss" in m), None)
        if last is not None:
            print(f"done: step {result.last_step}, loss {last['loss']:.4f}; metrics in {a.workdir}/metrics.jsonl")
    return 0


def run(default_config: str) -> None:
    """Entry point of launch/stageN.py: `default_config` is 'configs/stageN.py:tiny' (the file's own)."""
    stage_file = os.path.splitext(os.path.basename(default_config.split(":")[0]))[0]
    argv = sys.argv[1:]
    device_memory.set_default_fraction()
    if any(x in ("-h", "--help") for x in argv):
        parser(stage_file).print_help()
        sys.exit(0)
    sys.exit(run_cli(lambda: main(stage_file, default_config, argv)))
