"""Writing safetensors files one tensor at a time: the header (every name, dtype, shape and offset) is known
before any data is read, so a shard is written front to back while only one tensor sits in host memory.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__"},
then the raw little-endian tensor bytes in header order. Large models are split into shards named as
transformers names them (`model-00001-of-00004.safetensors` + `model.safetensors.index.json`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {"bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)), "float16": ("F16", np.dtype(np.float16)),
          "float32": ("F32", np.dtype(np.float32))}


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name and final shape now, its values from `fetch()` when its turn comes."""
    name: str
    shape: tuple[int, ...]
    fetch: Callable[[], np.ndarray]


def _nbytes(t: PendingTensor, dtype: np.dtype) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize


def write_file(path: str, tensors: Sequence[PendingTensor], dtype: str, metadata: dict | None = None) -> None:
    code, np_dtype = DTYPES[dtype]
    header, offset = {}, 0
    for t in tensors:
        size = _nbytes(t, np_dtype)
        header[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = np.asarray(t.fetch())
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"tensor {t.name!r} has shape {value.shape}, the header says {t.shape}")
            f.write(np.ascontiguousarray(value.astype(np_dtype, copy=False)).astype(np_dtype.newbyteorder("<"),
                                                                                      copy=False).tobytes())


def write_sharded(directory: str, tensors: Sequence[PendingTensor], dtype: str, *, max_shard_bytes: int = 5 * 2 ** 30,
                  stem: str = "model", metadata: dict | None = None) -> list[str]:
    """`stem.safetensors`, or shards + `stem.safetensors.index.json` when the tensors exceed `max_shard_bytes`.
    Returns the file names written."""
    np_dtype = DTYPES[dtype][1]
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        n = _nbytes(t, np_dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        write_file(os.path.join(directory, f"{stem}.safetensors"), shards[0], dtype, meta)
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(os.path.join(directory, name), shard, dtype, meta)
        weight_map.update({t.name: name for t in shard})
    total = sum(_nbytes(t, np_dtype) for t in tensors)
    with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [f"{stem}.safetensors.index.json"]
