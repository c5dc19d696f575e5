"""CLIP ViT vision encoder (openai/clip-vit-large-patch14-336) in Flax linen.

Returns what VideoLLaMA2's `CLIPVisionTower` feeds its connector: HF `hidden_states[select_layer]` with the
CLS token dropped. Layers after the selected one (and `post_layernorm`) are never built, so a converted
checkpoint holds exactly the weights that are used.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from exo2ego_jax.errors import check_choice
from exo2ego_jax.models.layers import ATTENTION_IMPLS, constrain, dot_product_attention, run_layers, tag

SELECT_FEATURES = ("patch", "cls_patch")
HIDDEN = ("activation_batch", "activation_length", "activation_embed")  # frames are the batch


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    select_feature: str = "patch"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        check_choice("select_feature", self.select_feature, SELECT_FEATURES)
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside [-{self.num_layers + 1}, "
                             f"{self.num_layers}] for a {self.num_layers}-layer encoder")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_built_layers(self) -> int:
        """Layers needed for HF `hidden_states[select_layer]` ([0] is the pre-LN embedding output)."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> CLIPVisionConfig:
        """From a HF `CLIPVisionConfig` dict (or a `CLIPConfig` dict with a `vision_config` entry)."""
        hf = hf.get("vision_config", hf)
        if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; CLIP ViT uses quick_gelu")
        kwargs = dict(hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                      patch_size=hf["patch_size"], image_size=hf["image_size"],
                      num_channels=hf.get("num_channels", 3), layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _dense(cfg: CLIPVisionConfig, features: int, axes, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def _layer_norm(cfg: CLIPVisionConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class CLIPAttention(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_heads
        heads = ("activation_batch", "activation_length", "activation_heads", None)
        split = lambda t: constrain(t.reshape(*t.shape[:-1], cfg.num_heads, head_dim), heads)
        q = tag(split(_dense(cfg, cfg.hidden_size, ("embed", "heads"), "q_proj")(x)), "query_proj")
        k = tag(split(_dense(cfg, cfg.hidden_size, ("embed", "heads"), "k_proj")(x)), "key_proj")
        v = tag(split(_dense(cfg, cfg.hidden_size, ("embed", "heads"), "v_proj")(x)), "value_proj")
        out = constrain(dot_product_attention(q, k, v, impl=cfg.attention_impl), heads)
        out = tag(out.reshape(*out.shape[:-2], cfg.hidden_size), "attention_out")
        return _dense(cfg, cfg.hidden_size, ("heads", "embed"), "out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x, _unused=None):
        cfg = self.config
        x = constrain(x, HIDDEN)
        x = x + CLIPAttention(cfg, name="self_attn")(_layer_norm(cfg, "layer_norm1")(x))
        h = _layer_norm(cfg, "layer_norm2")(x)
        h = quick_gelu(_dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "fc1")(h))
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        x = x + _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2")(h)
        return constrain(x, HIDDEN), None


class CLIPVisionEncoder(nn.Module):
    """pixels [N, H, W, C] (CLIP-normalised, NHWC) -> selected-layer features [N, P, D] (CLS dropped)."""
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"CLIP expects pixels [N, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (NHWC, "
                f"frames folded into N); got {tuple(pixel_values.shape)}")
        x = self.embed(pixel_values.astype(cfg.dtype))
        x = _layer_norm(cfg, "pre_layrnorm")(x)
        if cfg.num_built_layers:
            layer_kwargs = dict(config=cfg)
            x, _ = run_layers(CLIPEncoderLayer, layer_kwargs, x, (), per_layer=(),
                              num_layers=cfg.num_built_layers, scan=cfg.scan_layers,
                              remat_policy=cfg.remat_policy)
        return x[:, 1:] if cfg.select_feature == "patch" else x

    def embed(self, pixel_values):
        cfg = self.config
        patches = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                          padding="VALID", use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   (None, None, None, "embed")),
                          name="patch_embedding")(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (cfg.hidden_size,), cfg.param_dtype)
        pos = self.param("position_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                         (cfg.num_patches + 1, cfg.hidden_size), cfg.param_dtype)
        cls = jnp.broadcast_to(cls.astype(cfg.dtype), (patches.shape[0], 1, cfg.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + pos.astype(cfg.dtype)
