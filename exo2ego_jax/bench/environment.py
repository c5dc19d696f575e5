"""Process set-up for compiling for a device this machine does not have. Imports no JAX: it must run first.

GPU and TPU targets compile through their plugins on the CPU platform (JAX_PLATFORMS=cpu); fake CPU targets need
their device count before JAX starts; without a GPU, XLA cannot autotune Triton gemms, and cuBLAS calls are the
closer stand-in for a real build; parallel compiles each load libtpu, which it allows only when told.
"""
from __future__ import annotations

import os
import sys

from exo2ego_jax.bench.targets import Topology  # imports no JAX


def flag_value(argv, flag: str, default: str | None) -> str | None:
    """A flag's value from the raw command line (`--flag=value` or `--flag value`)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def prepare_for_target(target: str | None, topology: str | None) -> None:
    """Set the environment for compiling for `target` (None: run on this machine's devices, change nothing)."""
    if target is None:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if target == "cpu":
        try:
            n = Topology.parse(topology or "1x1x8").num_devices
        except ValueError:
            n = 1
        flags += f" --xla_force_host_platform_device_count={n}"
    elif target.startswith("h"):
        flags += " --xla_gpu_enable_triton_gemm=false"
    os.environ["XLA_FLAGS"] = flags.strip()


def prepare_from_argv(default_target: str | None, argv=None) -> None:
    argv = sys.argv if argv is None else argv
    prepare_for_target(flag_value(argv, "target", default_target), flag_value(argv, "topology", None))
