"""Reading safetensors: this project's reader (exo2ego_jax/convert/safetensors_reader.py) vs safetensors' own
`safe_open`, on the same files, best of --reps, into host numpy arrays (what the converters consume).

  python launch/bench_safetensors.py [--mib 144] [--reps 5]

bfloat16 (the released 7B weights): safe_open's numpy framework cannot return bf16, so it is timed with the
flax framework (jax arrays, then numpy) and with torch (`.float()` is not applied: the raw bf16 tensor viewed as
numpy uint16 and copied out, since it may be memory-mapped). float32: safe_open's numpy framework. Every reader
returns arrays that own their bytes, checked equal to ours. Files sit in the page cache (best of --reps): this
measures the readers, not the disk.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from exo2ego_jax.convert.safetensors_reader import SafetensorsCheckpoint
from exo2ego_jax.provenance import commit, machine


def write(folder: str, mib: float, dtype) -> str:
    """A Mistral-layer-like file: 4096-wide matrices up to `mib` MiB."""
    rng = np.random.default_rng(0)
    itemsize = np.dtype(dtype).itemsize
    rows = max(1, int(mib * 2 ** 20 / itemsize / 4096 / 8))
    tensors = {f"model.layers.{i}.mlp.weight": rng.normal(size=(rows, 4096)).astype(np.float32).astype(dtype)
               for i in range(8)}
    path = os.path.join(folder, "model.safetensors")
    if dtype == ml_dtypes.bfloat16:  # safetensors.numpy cannot write bf16; its flax writer can
        import jax.numpy as jnp
        from safetensors.flax import save_file as save_jax
        save_jax({k: jnp.asarray(v) for k, v in tensors.items()}, path)
        return path
    save_file(tensors, path)
    return path


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ours(folder: str):
    ckpt = SafetensorsCheckpoint(folder)
    return [ckpt.read(k) for k in ckpt.keys()]  # noqa: SIM118  (read: one copy out of the memory map)


def theirs(path: str, framework: str):
    out = []
    with safe_open(path, framework=framework) as f:
        for k in f.keys():  # noqa: SIM118
            t = f.get_tensor(k)
            if framework == "flax":
                out.append(np.asarray(t))
            elif framework == "pt":
                import torch
                # get_tensor may hand back a memory-mapped tensor; copy it out, as the other readers do
                out.append(np.array(t.view(torch.int16).numpy().view(np.uint16).view(ml_dtypes.bfloat16)))
            else:
                out.append(t)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=144.0, help="file size")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    rows = []
    for name, dtype, frameworks in (("bfloat16", ml_dtypes.bfloat16, ("flax", "pt")), ("float32", np.float32,
                                                                                       ("numpy",))):
        with tempfile.TemporaryDirectory() as folder:
            path = write(folder, a.mib, dtype)
            size = os.path.getsize(path) / 2 ** 20
            reference = ours(folder)
            rows.append((name, "exo2ego_jax reader", best(lambda folder=folder: ours(folder), a.reps), size))
            for fw in frameworks:
                got = theirs(path, fw)
                assert all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(reference, got))
                rows.append((name, f"safe_open({fw})", best(lambda fw=fw, path=path: theirs(path, fw), a.reps), size))
    print(f"{a.mib:.0f} MiB files; commit {commit()}, {machine()}, {time.strftime('%Y-%m-%d')}\n")
    print(f"| dtype | reader | best of {a.reps} s | MiB/s |\n|---|---|---|---|")
    for name, reader, seconds, size in rows:
        print(f"| {name} | {reader} | {seconds:.3f} | {size / seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
