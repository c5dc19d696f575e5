"""How much of a GPU's memory a training process may use, in one place for the trainer and the AOT check.

JAX preallocates 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise. The 7b presets are
sized for 90% (what `launch/aot_compile.py` calls fitting), so the training CLI raises the default to that;
the rest is left to cuDNN/cuBLAS workspaces and the CUDA context. A value the user exported wins.
"""
from __future__ import annotations

import os

FRACTION = 0.9


def set_default_fraction() -> None:
    """Call before JAX creates its GPU client (the first jax.devices()); a no-op on CPU."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(FRACTION))


def usable_bytes(device_bytes: int) -> int:
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", FRACTION))
    return int(device_bytes * fraction)
