"""Command line shared by launch/stage0.py ... stage3.py.

  python launch/stage3.py --config configs/stage3.py:7b --workdir /workdirs/stage3 [--config.batch_size=128]
  multi-host: add --distributed (cluster environment: SLURM, Open MPI, Kubernetes/TPU metadata) or
  --coordinator_address HOST:PORT --num_processes N --process_id I
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from exo2ego_jax.errors import Exo2EgoError
from exo2ego_jax.train.loop import train

FLAGS = flags.FLAGS


def define_flags(default_config: str) -> None:
    config_flags.DEFINE_config_file("config", default_config, "stage config file with :preset", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the export go", required=True)
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() from the cluster environment")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for jax.distributed")
    flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
    flags.DEFINE_bool("progress", True, "show a progress bar")


def init_distributed() -> None:
    """Start jax.distributed once, in the main process only (Grain workers re-run module init: grain#802)."""
    if multiprocessing.parent_process() is not None:
        return
    explicit = FLAGS.coordinator_address is not None
    if not (explicit or FLAGS.distributed):
        return
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if FLAGS.num_processes is None or FLAGS.process_id is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:
        jax.distributed.initialize()


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    init_distributed()
    try:
        result = train(FLAGS.config, FLAGS.workdir, show_progress=FLAGS.progress)
    except Exo2EgoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.metrics:
        last = result.metrics[-1]
        print(f"done: step {result.last_step}, loss {last['loss']:.4f}; metrics in {FLAGS.workdir}/metrics.jsonl")
    return 0


def run(default_config: str) -> None:
    define_flags(default_config)
    app.run(lambda argv: sys.exit(main(argv)))
