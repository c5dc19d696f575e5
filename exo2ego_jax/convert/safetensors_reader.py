"""Lazy, tensor-by-tensor reading of HF safetensors checkpoints (one file or sharded with an index).

The file format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
data_offsets}}, then raw little-endian data. Each tensor is read through a memory map and copied out on its
own, so host memory holds one tensor at a time, and bfloat16 works without torch (via ml_dtypes).
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from exo2ego_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """All tensors of a HF checkpoint folder, read lazily by name."""

    def __init__(self, hf_dir: str):
        """`hf_dir`: a folder (one file, or shards with an index), or the path of one .safetensors file."""
        single = hf_dir.endswith(".safetensors") and os.path.isfile(hf_dir)
        if not single and not os.path.isdir(hf_dir):
            raise CheckpointError(f"--hf_dir {hf_dir!r} is not a directory")
        self.hf_dir = os.path.dirname(hf_dir) if single else hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if single:
            files, weight_map, hf_dir = [os.path.basename(hf_dir)], None, self.hf_dir
        elif os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path} is not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(
                f"no *.safetensors files in {hf_dir!r}; save the HF model with `save_pretrained(..., "
                "safe_serialization=True)` or point --hf_dir at the folder that holds the weights")
        self._headers: dict[str, tuple[str, int, dict]] = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{INDEX_FILE} names {name!r}, which is missing from {hf_dir!r}")
            header, data_start = _read_header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if key in self._headers:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._headers[key][0]} and {path}")
                self._headers[key] = (path, data_start, info)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._headers))
            if missing:
                raise CheckpointError(f"{INDEX_FILE} lists tensors not found in the shards: {missing[:5]}")

    def keys(self) -> list[str]:
        return sorted(self._headers)

    def __contains__(self, key: str) -> bool:
        return key in self._headers

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info(key)[2]["shape"])

    def read(self, key: str) -> np.ndarray:
        """Copy one tensor into memory (other tensors are never touched)."""
        with self.view(key) as arr:
            return np.array(arr)

    @contextlib.contextmanager
    def view(self, key: str):
        """A read-only memory-mapped array of one tensor, valid inside the `with` block.

        Lets the caller transpose/cast straight into its destination (e.g. one slice of a stacked array)
        without an intermediate copy.
        """
        path, data_start, info = self._info(key)
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"tensor {key!r} in {path}: byte range does not match shape {shape}")
        if end == begin:
            yield np.zeros(shape, dtype)
            return
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        try:
            yield mm.view(dtype).reshape(shape)
        finally:
            del mm

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.keys():
            yield key, self.read(key)

    def _info(self, key: str):
        try:
            return self._headers[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.hf_dir!r}") from None


def _read_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from e
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"tensor {key!r} in {path} has unsupported dtype {info.get('dtype')!r}")
        end = max(end, int(info.get("data_offsets", (0, 0))[1]))
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}; download it again")
    return header, 8 + n
