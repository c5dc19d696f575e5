"""Pallas splash attention (the TPU kernel, run here in Pallas' interpret mode) against the `xla` implementation in
float32: the attention op on its own (causal, padded, windowed, GQA, bidirectional; values and gradients), under a
mesh through shard_map, and the whole Mistral and CLIP models with attention_impl='splash'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionEncoder
from exo2ego_jax.models.layers import dot_product_attention
from exo2ego_jax.models.mistral import MistralConfig, MistralForCausalLM
from exo2ego_jax.models.splash import compiling_for_tpu, splash_attention

TOL = 1e-5


def qkv(b=2, t=77, n=4, kv=2, h=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, kv, h)),
            jax.random.normal(keys[2], (b, t, kv, h)))


def reference(q, k, v, valid, causal, window=None):
    t = q.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = jnp.broadcast_to(valid[:, None, None, :], (q.shape[0], 1, t, t))
    if causal:
        mask = mask & (j <= i)
    if window:
        mask = mask & (i - j < window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@pytest.mark.parametrize("causal,window", [(True, None), (True, 9), (False, None)])
def test_splash_matches_xla_with_padding_gqa_and_windows(causal, window):
    q, k, v = qkv()
    lengths = jnp.array([77, 41])  # the second row right-padded; 77 is not a multiple of the 128-row blocks
    valid = jnp.arange(77)[None] < lengths[:, None]
    got = splash_attention(q, k, v, is_causal=causal, segment_ids=valid.astype(jnp.int32), local_window=window)
    want = reference(q, k, v, valid, causal, window)
    real = valid[:, :, None, None]  # padded query rows are never read; their values differ by construction
    assert float(jnp.abs(jnp.where(real, got - want, 0)).max()) < TOL

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    grads = jax.grad(loss(lambda q, k, v: splash_attention(q, k, v, is_causal=causal, local_window=window,
                                                           segment_ids=valid.astype(jnp.int32))), (0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss(lambda q, k, v: reference(q, k, v, valid, causal, window)), (0, 1, 2))(q, k, v)
    for g, w in zip(grads, want_grads):
        scale = float(jnp.abs(w).max())
        assert float(jnp.abs(g - w).max()) < TOL * max(1.0, scale), (float(jnp.abs(g - w).max()), scale)


def test_splash_dispatch_refuses_a_dense_mask_and_cross_attention():
    q, k, v = qkv(t=16)
    with pytest.raises(ValueError, match="segment_ids"):
        dot_product_attention(q, k, v, impl="splash", mask=jnp.ones((2, 1, 16, 16), bool))
    with pytest.raises(ValueError, match="self-attention"):
        splash_attention(q, k[:, :8], v[:, :8], is_causal=True)
    assert compiling_for_tpu() is False  # the CPU runs the interpret-mode kernel


def test_splash_under_a_mesh_splits_batch_and_heads():
    """shard_map over (data, fsdp) rows and tensor heads gives the same numbers as one device."""
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    q, k, v = qkv(b=4, t=40, n=4, kv=2)
    valid = jnp.arange(40)[None] < jnp.array([40, 30, 20, 10])[:, None]
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v, s: splash_attention(q, k, v, is_causal=True, segment_ids=s))(
            q, k, v, valid.astype(jnp.int32))
    want = reference(q, k, v, valid, True)
    assert float(jnp.abs(jnp.where(valid[:, :, None, None], got - want, 0)).max()) < TOL


def test_mistral_with_splash_attention_matches_xla_logits():
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, rope_theta=1e4, sliding_window=None)
    xla = MistralForCausalLM(MistralConfig(**cfg, attention_impl="xla"))
    splash = MistralForCausalLM(MistralConfig(**cfg, attention_impl="splash"))
    ids = jax.random.randint(jax.random.key(1), (2, 37), 0, 97)
    mask = jnp.arange(37)[None] < jnp.array([37, 25])[:, None]
    params = xla.init(jax.random.key(0), ids)["params"]
    want = xla.apply({"params": params}, ids, attention_mask=mask)
    got = splash.apply({"params": params}, ids, attention_mask=mask)
    assert float(jnp.abs(jnp.where(mask[..., None], got - want, 0)).max()) < 1e-4  # logits, two layers deep


def test_mistral_sliding_window_with_splash_matches_xla():
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
               head_dim=16, rope_theta=1e4, sliding_window=5)
    ids = jax.random.randint(jax.random.key(2), (1, 30), 0, 50)
    xla = MistralForCausalLM(MistralConfig(**cfg, attention_impl="xla"))
    params = xla.init(jax.random.key(0), ids)["params"]
    want = xla.apply({"params": params}, ids)
    got = MistralForCausalLM(MistralConfig(**cfg, attention_impl="splash")).apply({"params": params}, ids)
    assert float(jnp.abs(got - want).max()) < 1e-4


def test_clip_tower_with_splash_attention_matches_xla():
    cfg = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=4, image_size=36)
    pixels = jax.random.normal(jax.random.key(3), (2, 36, 36, 3))  # 81 + 1 tokens: padded to 128 inside
    xla = CLIPVisionEncoder(CLIPVisionConfig(**cfg, attention_impl="xla"))
    params = xla.init(jax.random.key(0), pixels)["params"]
    want = xla.apply({"params": params}, pixels)
    got = CLIPVisionEncoder(CLIPVisionConfig(**cfg, attention_impl="splash")).apply({"params": params}, pixels)
    leaves = lambda x: jax.tree.leaves(x)
    for a, b in zip(leaves(got), leaves(want)):
        assert float(jnp.abs(a - b).max()) < TOL * 10, float(jnp.abs(a - b).max())
