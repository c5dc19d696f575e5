"""From a loader's per-process numpy batch to the global device arrays a jitted step takes."""
from __future__ import annotations

import hashlib

import jax
import numpy as np

from exo2ego_jax.constants import IGNORE_INDEX
from exo2ego_jax.data.preprocess import normalize

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "ego_pixels", "exo_pixels")


def to_model_batch(local: dict, compute_dtype) -> dict:
    """uint8 frames -> CLIP-normalised pixels; keeps the token arrays."""
    out = {k: local[k] for k in ("input_ids", "attention_mask", "labels")}
    for src, dst in (("ego_frames", "ego_pixels"), ("exo_frames", "exo_pixels")):
        if src in local:
            out[dst] = normalize(local[src], compute_dtype)
    return out


def agree_on_text_width(local: dict) -> dict:
    """Length-bucketed loaders pick a width per process; every process must feed the same global shape, so
    rows are right-padded to the widest process's width (one tiny all-gather per step, multi-host only)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    width = int(np.max(multihost_utils.process_allgather(np.int32(local["input_ids"].shape[1]))))
    pad = width - local["input_ids"].shape[1]
    if pad == 0:
        return local
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": False}
    out = dict(local)
    for key, value in fill.items():
        out[key] = np.pad(local[key], ((0, 0), (0, pad)), constant_values=value)
    return out


def global_batch(local: dict, sharding) -> dict:
    """This process's rows of every input, assembled into global arrays sharded as `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def batch_fingerprint(batch: dict) -> str:
    """A short hash of which examples (global rows) a batch holds, logged to check resume exactness."""
    rows = batch.get("_global_rows")
    data = rows.tobytes() if rows is not None else np.asarray(batch["input_ids"]).tobytes()
    return hashlib.sha1(data).hexdigest()[:12]
