"""Mistral decoder (Mistral-7B-Instruct-v0.2) in Flax linen, with LoRA, scan/remat and a KV cache.

Numerics follow HF `MistralForCausalLM`: rotate-half RoPE (HF q/k weights load with a plain transpose),
RMSNorm statistics in float32, SwiGLU MLP, GQA, untied `lm_head`, logits returned in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from exo2ego_jax.errors import check_choice
from exo2ego_jax.models.layers import (ATTENTION_IMPLS, constrain, dot_product_attention, rms_norm_f32, run_layers,
                                       tag)
from exo2ego_jax.models.lora import LoRAConfig, LoRADense

HIDDEN = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", None)
KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    lora: LoRAConfig | None = None

    def __post_init__(self):
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoRAConfig(**{**self.lora, "targets": tuple(self.lora["targets"])}))

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> MistralConfig:
        """From a HF `MistralConfig` dict (also VideoLLaMA2's `videollama2_mistral` config)."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; Mistral uses silu")
        if hf.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=True is not supported: Mistral's lm_head is untied")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        kwargs = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                      num_heads=hf["num_attention_heads"],
                      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                      head_dim=head_dim, rope_theta=float(rope_theta), rms_norm_eps=hf["rms_norm_eps"],
                      sliding_window=hf.get("sliding_window"),
                      max_position_embeddings=hf.get("max_position_embeddings", 32768),
                      bos_token_id=_first(hf.get("bos_token_id"), 1), eos_token_id=_first(hf.get("eos_token_id"), 2),
                      pad_token_id=_first(hf.get("pad_token_id"), 0))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _first(value, default):
    if value is None:
        return default
    return value[0] if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------------
# RoPE, masks and the KV cache.


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """cos/sin tables [B, S, head_dim] for the rotate-half convention, computed in float32 as HF does."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, D]; HF casts the tables to x's dtype before rotating."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def init_cache(config: MistralConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache for `max_length` slots.

    `k`/`v` [L, B, T, K, D] are stacked over layers; `valid` [B, T] marks slots holding real tokens (pads of
    a right-padded prompt stay invalid forever); `positions` [B, T] holds their RoPE positions (for the
    sliding window); `next_position` [B] is where each sequence continues; `index` is the next free slot.
    """
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                valid=jnp.zeros((batch_size, max_length), bool),
                positions=jnp.zeros((batch_size, max_length), jnp.int32),
                next_position=jnp.zeros((batch_size,), jnp.int32),
                index=jnp.zeros((), jnp.int32))


def _causal_mask(q_pos, k_pos, k_valid, window: int | None):
    """Boolean [B, 1, Q, K]: key valid, not in the future, and inside the sliding window (HF semantics)."""
    mask = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return mask[:, None]


# ----------------------------------------------------------------------------------------------------------
# Modules.


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                            (x.shape[-1],), self.param_dtype)
        return rms_norm_f32(x.astype(self.dtype), weight, self.eps)


class MistralAttention(nn.Module):
    config: MistralConfig
    deterministic: bool = True

    def _proj(self, features, axes, target, name):
        cfg = self.config
        lora = cfg.lora if cfg.lora is not None and cfg.lora.applies_to(target) else None
        return LoRADense(features, axes, lora=lora, deterministic=self.deterministic, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, cos, sin, attn, layer_cache):
        cfg = self.config
        b, s, _ = x.shape
        q = self._proj(cfg.num_heads * cfg.head_dim, ("embed", "heads"), "q", "q_proj")(x)
        k = self._proj(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), "k", "k_proj")(x)
        v = self._proj(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), "v", "v_proj")(x)
        q = tag(constrain(apply_rope(q.reshape(b, s, cfg.num_heads, cfg.head_dim), cos, sin), HEADS), "query_proj")
        k = tag(constrain(apply_rope(k.reshape(b, s, cfg.num_kv_heads, cfg.head_dim), cos, sin), KV_HEADS),
                "key_proj")
        v = tag(constrain(v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim), KV_HEADS), "value_proj")
        new_cache = None
        if layer_cache is not None:
            index = attn["index"]
            k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
            new_cache = dict(k=k_all, v=v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        if "mask" in attn:
            out = dot_product_attention(q, k, v, impl="xla", mask=attn["mask"])
        elif "segment_ids" in attn:  # splash (TPU): causal + window + padding as segment 0
            out = dot_product_attention(q, k, v, impl="splash", is_causal=True, segment_ids=attn["segment_ids"],
                                        local_window=cfg.sliding_window)
        else:  # cuDNN flash path: causal + right-padding lengths + window
            out = dot_product_attention(q, k, v, impl="cudnn", is_causal=True, kv_lengths=attn["kv_lengths"],
                                        local_window=cfg.sliding_window)
        out = tag(constrain(out, HEADS).reshape(b, s, cfg.num_heads * cfg.head_dim), "attention_out")
        return self._proj(cfg.hidden_size, ("heads", "embed"), "o", "o_proj")(out), new_cache


class MistralMLP(nn.Module):
    config: MistralConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def proj(features, axes, target, name):
            lora = cfg.lora if cfg.lora is not None and cfg.lora.applies_to(target) else None
            return LoRADense(features, axes, lora=lora, deterministic=self.deterministic, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, name=name)

        mlp = ("activation_batch", "activation_length", "activation_mlp")
        gate = tag(constrain(proj(cfg.intermediate_size, ("embed", "mlp"), "gate", "gate_proj")(x), mlp), "mlp_gate")
        up = tag(constrain(proj(cfg.intermediate_size, ("embed", "mlp"), "up", "up_proj")(x), mlp), "mlp_up")
        return proj(cfg.hidden_size, ("mlp", "embed"), "down", "down_proj")(jax.nn.silu(gate) * up)


class MistralDecoderLayer(nn.Module):
    config: MistralConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cos, sin, attn, layer_cache):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        x = constrain(x, HIDDEN)
        h, new_cache = MistralAttention(cfg, self.deterministic, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, attn, layer_cache)
        x = x + h
        x = x + MistralMLP(cfg, self.deterministic, name="mlp")(norm("post_attention_layernorm")(x))
        return constrain(x, HIDDEN), new_cache


class MistralDecoderStack(nn.Module):
    """The `num_layers` decoder layers, scanned or unrolled (a compact module so it can build them)."""
    config: MistralConfig

    @nn.compact
    def __call__(self, x, cos, sin, attn, layer_caches, deterministic: bool = True):
        cfg = self.config
        return run_layers(
            MistralDecoderLayer, dict(config=cfg, deterministic=deterministic), x,
            (cos, sin, attn, layer_caches), per_layer=(False, False, False, True),
            num_layers=cfg.num_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy)


class MistralForCausalLM(nn.Module):
    """Decoder-only LM. `__call__` returns float32 logits [B, S, V] (and the updated cache when given one)."""
    config: MistralConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.decoder = MistralDecoderStack(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        self.lm_head = nn.Dense(
            cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                 cache: dict | None = None, deterministic: bool = True):
        hidden, new_cache = self.decode(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, cache=cache, deterministic=deterministic)
        logits = self.lm_head(hidden).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def decode(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
               cache=None, deterministic=True):
        """Final-norm hidden states [B, S, D] (before `lm_head`), and the updated cache (None without one)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        b, s = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        attention_mask = attention_mask.astype(bool)

        if cache is None:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if cfg.attention_impl == "cudnn":
                # Right padding only: the key length is the number of real tokens.
                attn = dict(kv_lengths=attention_mask.sum(-1).astype(jnp.int32))
            elif cfg.attention_impl == "splash":
                # Any padding pattern; the window counts slots, which are the positions unless the caller
                # passes position_ids that skip (left padding with a sliding window: use `xla`).
                attn = dict(segment_ids=attention_mask.astype(jnp.int32))
            else:
                slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                mask = _causal_mask(slots, slots, attention_mask, None)
                if cfg.sliding_window is not None:
                    mask &= ((position_ids[:, :, None] - position_ids[:, None, :]) < cfg.sliding_window)[:, None]
                attn = dict(mask=mask)
            layer_caches = None
        else:
            index = cache["index"]
            if position_ids is None:
                # Continue each sequence where it stopped; pads do not advance the position.
                position_ids = cache["next_position"][:, None] + jnp.cumsum(attention_mask, -1) - 1
                position_ids = jnp.maximum(position_ids, 0).astype(jnp.int32)
            valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, index))
            positions = jax.lax.dynamic_update_slice(cache["positions"], position_ids.astype(jnp.int32), (0, index))
            t = valid.shape[1]
            q_slots = jnp.broadcast_to(index + jnp.arange(s, dtype=jnp.int32), (b, s))
            k_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = _causal_mask(q_slots, k_slots, valid, None)
            if cfg.sliding_window is not None:
                mask &= ((position_ids[:, :, None] - positions[:, None, :]) < cfg.sliding_window)[:, None]
            attn = dict(mask=mask, index=index)
            layer_caches = dict(k=cache["k"], v=cache["v"])

        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        x, new_layer_caches = self.decoder(x, cos, sin, attn, layer_caches, deterministic)
        x = self.norm(x)

        new_cache = None
        if cache is not None:
            new_cache = dict(k=new_layer_caches["k"], v=new_layer_caches["v"], valid=valid, positions=positions,
                             next_position=cache["next_position"] + attention_mask.sum(-1).astype(jnp.int32),
                             index=cache["index"] + s)
        return x, new_cache
