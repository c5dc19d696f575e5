"""TPU-native attention: Pallas splash attention, laid out over the mesh with `shard_map`.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a block-sparse flash kernel: it never
materialises the [T, S] score matrix and skips the blocks a static mask rules out (the upper triangle of a causal
mask, everything outside a sliding window). Per-token masking (padding) comes in as segment ids: a query only
sees keys of its own segment. It works on one sequence ([heads, T, head_dim]); `vmap` takes it over the batch.

Layout. The kernel is a custom call the SPMD partitioner cannot split, so it runs under `shard_map`: each
device applies it to its own rows (the mesh's batch axes) and its own heads (the tensor axis, when the head
counts divide it). Sequences are padded to a multiple of the kernel's 128-row blocks; the padded keys get their
own segment, so real queries never see them.

Where it runs. On a TPU (or when compiling for one) the kernel lowers to a Mosaic `tpu_custom_call`. Anywhere
else it runs in Pallas' interpret mode: the same algorithm in plain XLA ops, slow but exact, which is how the
CPU tests check it against the `xla` implementation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the kernel's default block along both sequences (BlockSizes.get_default())
PADDING_SEGMENT = 0
TOKEN_SEGMENT = 1


def _kernel_module():
    # Imported lazily: Pallas' TPU ops pull in Mosaic, which a GPU-only run never needs.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    return kernel, masks


def compiling_for_tpu() -> bool:
    """True when the program being traced is for TPU devices: the default backend, or the devices of the mesh
    set by `jax.set_mesh` (ahead-of-time compilation for a TPU topology runs on the CPU backend)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform == "tpu"
    return jax.default_backend() == "tpu"


def _make_kernel(heads: int, length: int, causal: bool, window: int | None, interpret: bool):
    # Built per trace, not cached: the kernel holds its block masks as arrays, which must belong to the trace
    # that uses them (a cached kernel leaks one scan's tracers into the next).
    kernel, masks = _kernel_module()
    shape = (length, length)
    if window is not None:  # causal within `window` keys: kv in [q - window + 1, q] (HF's sliding window)
        head_mask = masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    elif causal:
        head_mask = masks.CausalMask(shape)
    else:
        head_mask = masks.FullMask(shape)
    return kernel.make_splash_mha(masks.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _batch_and_head_axes(batch: int, heads: int, kv_heads: int):
    """The mesh axes the batch and heads are split over inside `shard_map` (those that divide them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None, None
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in sizes)
    if batch % math.prod(sizes[a] for a in batch_axes):
        batch_axes = tuple(a for a in batch_axes if sizes[a] == 1)  # replicate rather than fail
    tensor = sizes.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None
    return mesh, batch_axes or None, head_axis


def splash_attention(query, key, value, *, is_causal: bool, segment_ids=None, local_window: int | None = None):
    """Attention on [B, T, N, H] query and [B, T, K, H] key/value (GQA when K < N), softmax scale 1/sqrt(H).

    `segment_ids` ([B, T] int, 0 = padding) keeps queries to the keys of their own segment; None: all tokens
    are one segment. Self-attention only (T keys for T queries): the KV-cache decode path uses `xla`.
    """
    b, t, n, h = query.shape
    if key.shape[1] != t:
        raise ValueError(f"splash attention is for self-attention over one sequence; got {t} queries and "
                         f"{key.shape[1]} keys (decode with a KV cache uses attention_impl='xla')")
    if segment_ids is None:
        segment_ids = jnp.full((b, t), TOKEN_SEGMENT, jnp.int32)
    padded = -(-t // BLOCK) * BLOCK
    if padded != t:
        grow = lambda x: jnp.pad(x, ((0, 0), (0, padded - t)) + ((0, 0),) * (x.ndim - 2))
        query, key, value = grow(query), grow(key), grow(value)
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)),
                              constant_values=PADDING_SEGMENT)
    # The name scope tells the HLO reader (bench/hlo.py) which static mask the kernel skips blocks by.
    mask_name = f"splash_mask_{f'window{local_window}' if local_window else 'causal' if is_causal else 'full'}"
    mesh, batch_axes, head_axis = _batch_and_head_axes(b, n, key.shape[2])
    local_heads = n // (dict(mesh.shape)[head_axis] if head_axis else 1)
    kernel = _make_kernel(local_heads, padded, bool(is_causal), local_window, not compiling_for_tpu())
    kernel_lib, _ = _kernel_module()
    scale = 1.0 / math.sqrt(h)

    def per_device(q, k, v, segments):
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, T, H]: the kernel's layout
        ids = kernel_lib.SegmentIds(q=segments, kv=segments)
        one = lambda q1, k1, v1, ids1: kernel(q1, k1, v1, segment_ids=ids1)
        q = heads_first(q * jnp.asarray(scale, q.dtype))
        out = jax.vmap(one)(q, heads_first(k), heads_first(v), ids)
        return jnp.swapaxes(out, 1, 2)

    with jax.named_scope(mask_name):
        if mesh is None:
            out = per_device(query, key, value, segment_ids)
        else:
            heads = P(batch_axes, None, head_axis, None)
            out = jax.shard_map(per_device, mesh=mesh, in_specs=(heads, heads, heads, P(batch_axes, None)),
                                out_specs=heads, check_vma=False)(query, key, value, segment_ids)
    return out[:, :t]
