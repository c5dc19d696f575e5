"""The conversion engine shared by every HF -> Orbax converter.

A converter is a list of `TensorRule`s (target param path <- HF tensor name + layout transform). The engine
checks the whole plan against the checkpoint headers and the model's abstract param tree before reading any
data, then streams tensors one by one (stacking per-layer tensors for scan) into an Orbax checkpoint written
with partial saves, so host memory stays near one (stacked) tensor plus a bounded write buffer.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable

import numpy as np
from flax import traverse_util
from tqdm import tqdm

from exo2ego_jax.checkpoints import PARAMS_DIR, copy_tokenizer_files, write_model_config
from exo2ego_jax.convert.safetensors_reader import SafetensorsCheckpoint
from exo2ego_jax.errors import CheckpointError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A PyTorch -> Flax layout change, with its effect on shapes (for header-only checks) and its inverse
    (Flax -> PyTorch, for the exporters)."""
    name: str
    apply: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple], tuple]
    invert: Callable[[np.ndarray], np.ndarray]
    invert_shape: Callable[[tuple], tuple]


def _conv_to_torch(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (a.ndim - 1, a.ndim - 2) + tuple(range(a.ndim - 2)))


IDENTITY = Layout("identity", lambda a: a, tuple, lambda a: a, tuple)
# nn.Linear [out, in] <-> Dense kernel [in, out]
LINEAR = Layout("linear", lambda a: a.T, lambda s: tuple(reversed(s)), lambda a: a.T, lambda s: tuple(reversed(s)))
# ConvNd [out, in, *k] <-> flax Conv [*k, in, out] (also depthwise: in = 1)
CONV = Layout("conv", lambda a: np.transpose(a, tuple(range(2, a.ndim)) + (1, 0)),
              lambda s: tuple(s[2:]) + (s[1], s[0]), _conv_to_torch, lambda s: (s[-1], s[-2]) + tuple(s[:-2]))


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """`target` is a '/'-joined param path; `{layer}` in it and `{i}` in `source` mark per-layer tensors."""
    target: str
    source: str
    layout: Layout = IDENTITY


@dataclasses.dataclass(frozen=True)
class PlannedParam:
    target: str
    sources: list
    layout: Layout
    stacked: bool


def expand_rules(rules: Iterable[TensorRule], *, num_layers: int, scan: bool):
    """-> list of PlannedParam. Scanned targets stack all layers' sources along a new leading axis."""
    plan = []
    for rule in rules:
        if "{layer}" not in rule.target:
            plan.append(PlannedParam(rule.target, [rule.source], rule.layout, stacked=False))
        elif scan:
            plan.append(PlannedParam(rule.target.format(layer="layers"),
                                     [rule.source.format(i=i) for i in range(num_layers)], rule.layout, stacked=True))
        else:
            plan.extend(PlannedParam(rule.target.format(layer=f"layers_{i}"), [rule.source.format(i=i)], rule.layout,
                                     stacked=False) for i in range(num_layers))
    return plan


def detect_prefix(ckpt: SafetensorsCheckpoint, anchor: str, candidates: Iterable[str]) -> str:
    """The first candidate prefix under which `anchor` exists (e.g. 'vision_model.' for transformers 4.x)."""
    candidates = list(candidates)
    for prefix in candidates:
        if prefix + anchor in ckpt:
            return prefix
    raise CheckpointError(
        f"tensor {anchor!r} not found under any known prefix {candidates} in {ckpt.hf_dir!r}: this does not look "
        "like a checkpoint of the requested --kind")


def convert_checkpoint(ckpt: SafetensorsCheckpoint, plan, *, prefix: str, expected: dict, unused: Iterable[str],
                       out_dir: str, kind: str, config: dict, dtype: str = "bfloat16",
                       buffer_mb: float = 1024.0, extra_metadata: dict | None = None,
                       extra_params: dict | None = None, show_progress: bool = True) -> dict:
    """Check `plan` against the checkpoint and `expected` shapes, then stream it into `out_dir`.

    `expected`: '/'-path -> ShapeDtypeStruct of the target module (from `jax.eval_shape`). `unused`: regexes
    (full match, after the prefix) of checkpoint tensors that are known and deliberately not converted.
    `extra_params`: '/'-path -> array of params that do not come from the checkpoint (fresh inits).
    Returns a summary dict (also stored in model_config.json).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    np_dtype = np.dtype(DTYPES[dtype]) if dtype != "bfloat16" else _bf16()
    extra_params = extra_params or {}

    # 1. The plan must cover the module exactly.
    planned = {item.target for item in plan} | set(extra_params)
    missing_targets = sorted(set(expected) - planned)
    unknown_targets = sorted(planned - set(expected))
    if missing_targets or unknown_targets:
        raise CheckpointError(f"conversion plan does not match the {kind} module: params without a source "
                              f"{missing_targets[:5]}, planned params the module lacks {unknown_targets[:5]}")

    # 2. Header-only checks: every source exists with the right shape; every other tensor is known-unused.
    used = set()
    for item in plan:
        target, sources, layout = item.target, item.sources, item.layout
        want = tuple(expected[target].shape)
        if item.stacked:
            want = want[1:]
            if expected[target].shape[0] != len(sources):
                raise CheckpointError(f"param {target!r} stacks {expected[target].shape[0]} layers but the "
                                      f"checkpoint provides {len(sources)}")
        for src in sources:
            key = prefix + src
            if key not in ckpt:
                raise CheckpointError(f"tensor {key!r} (for param {target!r}) is missing from {ckpt.hf_dir!r}")
            got = layout.shape(ckpt.shape(key))
            if got != want:
                raise CheckpointError(f"tensor {key!r} has shape {ckpt.shape(key)} -> {got} after the {layout.name} "
                                      f"layout, but param {target!r} needs {want}: the checkpoint and its "
                                      f"config.json disagree")
            used.add(key)
    unused_res = [re.compile(p) for p in unused]
    skipped, unexpected = [], []
    for key in ckpt.keys():  # noqa: SIM118 (a checkpoint, not a dict)
        if key in used:
            continue
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None and any(p.fullmatch(rest) for p in unused_res) or any(p.fullmatch(key) for p in unused_res):
            skipped.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) in {ckpt.hf_dir!r} for --kind {kind}, e.g. "
                              f"{unexpected[:5]}: wrong --kind, or a model variant this converter does not know")

    # 3. Stream tensors into an Orbax checkpoint, flushing the buffer with partial saves.
    import orbax.checkpoint.experimental.v1 as ocp

    created = not os.path.exists(out_dir)  # a failed conversion removes what it created
    os.makedirs(out_dir, exist_ok=True)
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    for stale in (params_dir, params_dir + ".partial_save"):
        if os.path.exists(stale):
            raise CheckpointError(f"{stale} already exists; choose a new --out or delete it first")
    buffer: dict[str, np.ndarray] = {}
    buffer_bytes = 0
    limit = int(buffer_mb * 2 ** 20)

    def flush():
        nonlocal buffer, buffer_bytes
        if buffer:
            ocp.partial.save(params_dir, traverse_util.unflatten_dict(buffer, sep="/"))
            buffer, buffer_bytes = {}, 0
            _release_freed_memory()

    try:
        bar = tqdm(plan, desc=f"convert {kind}", unit="param", disable=not show_progress)
        for item in bar:
            target, sources, layout = item.target, item.sources, item.layout
            # Transpose and cast straight from the memory-mapped file into the destination: no other copy.
            value = np.empty(expected[target].shape, np_dtype)
            for i, src in enumerate(sources):
                with ckpt.view(prefix + src) as source:
                    if item.stacked:
                        value[i] = layout.apply(source)
                    else:
                        value[...] = layout.apply(source)
                    del source  # unmap before the next tensor
            buffer[target] = value
            buffer_bytes += value.nbytes
            value = None  # drop our reference now: Orbax's write copy + the next tensor must not overlap three
            if buffer_bytes >= limit:
                flush()
        for target, value in extra_params.items():
            buffer[target] = np.asarray(value).astype(np_dtype)
            buffer_bytes += buffer[target].nbytes
            if buffer_bytes >= limit:
                flush()
        flush()
        ocp.partial.finalize(params_dir)
    except BaseException:
        shutil.rmtree(params_dir + ".partial_save", ignore_errors=True)
        shutil.rmtree(params_dir, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise

    copied = copy_tokenizer_files(ckpt.hf_dir, out_dir)
    summary = write_model_config(out_dir, kind=kind, config=config, dtype=dtype, source=os.path.abspath(ckpt.hf_dir),
                                 converted_tensors=len(used), skipped_tensors=len(skipped),
                                 skipped_examples=skipped[:10], fresh_params=sorted(extra_params),
                                 tokenizer_files=copied, **(extra_metadata or {}))
    log.info("converted %d tensors (%d skipped as unused) into %s", len(used), len(skipped), out_dir)
    return summary


def _release_freed_memory():
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so the peak stays one tensor."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
