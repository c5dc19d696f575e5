"""Building blocks shared by the backbones: attention dispatch, remat policies, layer stacking."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from exo2ego_jax.errors import check_choice
from exo2ego_jax.models.splash import splash_attention

ATTENTION_IMPLS = ("xla", "cudnn", "splash")

# Named rematerialization policies, chosen by name in the config (the MaxText convention). Each entry maps
# to a `jax.checkpoint` policy; `None` means "do not wrap the layer in remat at all".
# Tensor names used by `save_*` policies are the `checkpoint_name` tags placed inside the layers.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    # Recompute everything inside a layer; keep only the layer inputs (lowest memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep every matmul output; recompute element-wise ops (norms, activations, RoPE).
    "dots": jax.checkpoint_policies.checkpoint_dots,
    # Keep matmul outputs without batch dims (projections), recompute attention score matmuls.
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep the q/k/v projections and the attention output; recompute the MLP (a good fit for LoRA steps
    # whose MLP is the bulk of activation memory).
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out"),
    # Keep the attention output and the MLP's two input projections; recompute q/k/v.
    "save_attn_mlp_in": jax.checkpoint_policies.save_only_these_names(
        "attention_out", "mlp_gate", "mlp_up"),
}


def tag(x: jax.Array, name: str) -> jax.Array:
    """Name an intermediate so `save_only_these_names` remat policies can keep it."""
    return checkpoint_name(x, name)


GRID = ("activation_batch", None, None, "activation_channels")  # [N, h, w, C] feature maps


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Pin an activation's layout by logical axis names (`activation_batch`, ...). A no-op unless the caller set
    `nn.logical_axis_rules` and a mesh (the train step does); without it XLA may move activations instead of
    weights (for example resharding q/k/v across FSDP devices)."""
    return nn.with_logical_constraint(x, names)


def dot_product_attention(query, key, value, *, impl: str, mask=None, is_causal: bool = False,
                          kv_lengths=None, segment_ids=None, local_window: int | None = None):
    """Scaled dot-product attention on [B, T, N, H] tensors (GQA when key/value have fewer heads).

    `impl='xla'` takes any boolean `mask` ([B, 1|N, T, S]); `impl='cudnn'` runs the cuDNN flash kernel and
    expresses masking as causal + right-padding lengths + a local window, which is all that kernel supports;
    `impl='splash'` runs Pallas' TPU splash kernel (models/splash.py) with causal + a local window + per-token
    `segment_ids` (0 = padding), any padding pattern. Softmax statistics are float32 in all three.

    jax 0.10.2's cuDNN path rejects an odd training length ("Unsupported sequence length": CLIP's 577 = 24 x 24
    + 1 tokens, or an unbucketed text): one padded position, masked out as a key through the per-sequence key
    lengths and dropped as a query, gives the same result.
    """
    if impl == "splash":
        if mask is not None or kv_lengths is not None:
            raise ValueError("attention_impl='splash' takes segment_ids/is_causal/local_window, not a mask")
        return splash_attention(query, key, value, is_causal=is_causal, segment_ids=segment_ids,
                                local_window=local_window)
    if impl == "cudnn":
        if mask is not None:
            raise ValueError("attention_impl='cudnn' takes kv_lengths/is_causal/local_window, not a dense mask")
        b, t = query.shape[:2]
        if t % 2 and key.shape[1] == t:
            pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
            lengths = kv_lengths if kv_lengths is not None else jnp.full((b,), t, jnp.int32)
            out = dot_product_attention(pad(query), pad(key), pad(value), impl="cudnn", is_causal=is_causal,
                                        kv_lengths=lengths, local_window=local_window)
            return out[:, :t]
        window = None if local_window is None else (local_window - 1, 0)
        return jax.nn.dot_product_attention(
            query, key, value, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
            local_window_size=window, implementation="cudnn")
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


def run_layers(layer_cls: type[nn.Module], layer_kwargs: dict, carry, layer_args: tuple, *,
               per_layer: tuple, num_layers: int, scan: bool, remat_policy: str):
    """Apply `num_layers` layers of `layer_cls` to `carry`; call from inside a parent's compact method.

    With `scan=True` the parameters are stacked along a leading `layers` axis (one compiled body, fast
    compile; params named `layers/...`). Otherwise the layers are separate modules `layers_0 ...` (often
    faster on GPU, jax-ml/jax#13356). `per_layer[i]` says whether `layer_args[i]` has a leading layer axis
    (a per-layer KV cache) or is shared by all layers. Each layer returns `(carry, out)`; the outs come back
    stacked along a leading layer axis.
    """
    check_choice("remat_policy", remat_policy, REMAT_POLICIES)
    block = layer_cls
    if remat_policy != "none":
        # prevent_cse is only needed outside scan (scan already keeps recomputation from being CSE'd).
        block = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=tuple(0 if p else nn.broadcast for p in per_layer),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return stack(**layer_kwargs, name="layers")(carry, *layer_args)
    outs = []
    for i in range(num_layers):
        args = tuple(jax.tree.map(lambda t, i=i: t[i], a) if p else a for a, p in zip(layer_args, per_layer))
        carry, out = block(**layer_kwargs, name=f"layers_{i}")(carry, *args)
        outs.append(out)
    stacked = None if outs[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return carry, stacked


def rms_norm_f32(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Mistral RMSNorm: statistics in float32, cast back, then scaled (HF's order of operations)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)
