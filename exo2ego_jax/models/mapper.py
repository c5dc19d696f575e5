"""Mapping functions F (ego -> exo) and G (exo -> ego) on per-frame CLIP patch grids.

`resnet`: the CycleGAN `resnet_9blocks` generator (reflection-padded 7x7 stem, two stride-2 convs, residual
blocks, two transposed-conv upsamplers, 7x7 head), norms without affine params, no output tanh by default
since CLIP features are unbounded. `mlp`: the paper's "FC layers instead of ResNet blocks" ablation, a per-token
residual MLP. Both map [N, h, w, C] -> [N, h, w, C] (h, w divisible by 4 for `resnet`).

Two choices of ours (the paper names the generator, nothing more):
  residual  F(x) = x + R(x) with R's last layer zero-initialised, so F starts as the identity: at the start of
            stage 2 the frozen LLM reads STC(F(x)) = STC(x), features its connector was trained on, instead of
            an arbitrary function of x. False: CycleGAN's plain generator F(x) = R(x).
  norm      "instance" (CycleGAN's InstanceNorm2d): per frame and channel over the grid. It removes each frame's
            mean feature, so R cannot depend on what is spread over the whole frame (the mean-pooled content a
            probe reads). "layer": per patch token over channels, which keeps frame-level content.
The dataclass defaults are CycleGAN's (what checkpoints written before these fields meant); `RECOMMENDED` is
what the presets and the converter use (chosen on the synthetic study's validation items, README).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from exo2ego_jax.errors import check_choice
from exo2ego_jax.models.layers import GRID, constrain

MAPPER_KINDS = ("resnet", "mlp")
MAPPER_NORMS = ("instance", "layer")
RECOMMENDED = dict(residual=True, norm="layer")


@dataclasses.dataclass(frozen=True)
class MapperConfig:
    kind: str = "resnet"
    channels: int = 1024      # CLIP width in = out
    width: int = 256          # ngf: stem width (x2, x4 after the downsamplers); MLP hidden width for `mlp`
    num_blocks: int = 9
    output_tanh: bool = False
    dropout: float = 0.0      # CycleGAN's use_dropout (0.5 there) inside residual blocks
    residual: bool = False    # F(x) = x + R(x), R's last layer zero-initialised (identity at init)
    norm: str = "instance"    # "instance" (per frame and channel over the grid) or "layer" (per token)
    norm_eps: float = 1e-5
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        check_choice("mapper.kind", self.kind, MAPPER_KINDS)
        check_choice("mapper.norm", self.norm, MAPPER_NORMS)
        if self.residual and self.output_tanh:
            raise ValueError("mapper.residual and mapper.output_tanh exclude each other (x + R(x) is unbounded)")
        if self.num_blocks < 0 or self.width <= 0:
            raise ValueError(f"mapper.num_blocks must be >= 0 and mapper.width > 0, got {self.num_blocks}, {self.width}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# CycleGAN initialises conv weights with N(0, 0.02) and biases with 0.
_INIT = nn.initializers.normal(0.02)


def instance_norm(x: jax.Array, eps: float) -> jax.Array:
    """InstanceNorm2d(affine=False): per sample and channel over H, W; biased variance; float32 stats."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over channels without affine params, per token; float32 stats."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def normalize(x: jax.Array, cfg: MapperConfig) -> jax.Array:
    return (instance_norm if cfg.norm == "instance" else layer_norm)(x, cfg.norm_eps)


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class _Conv(nn.Module):
    config: MapperConfig
    features: int
    kernel: int
    stride: int = 1
    padding: Any = "VALID"
    zero_init: bool = False   # the residual mapper's last layer

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.zeros if self.zero_init else _INIT
        return nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=self.padding,
                       use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="conv",
                       kernel_init=nn.with_logical_partitioning(init, (None, None, None, "channels")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)))(x)


class ResnetBlock(nn.Module):
    config: MapperConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        c = x.shape[-1]
        h = _Conv(cfg, c, 3, name="conv_0")(reflect_pad(x, 1))
        h = nn.relu(normalize(h, cfg))
        if cfg.dropout:
            h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = _Conv(cfg, c, 3, name="conv_1")(reflect_pad(h, 1))
        return constrain(x + normalize(h, cfg), GRID)


class ResnetGenerator(nn.Module):
    config: MapperConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        n, h, w, c = x.shape
        if h % 4 or w % 4:
            raise ValueError(f"the resnet mapper needs a grid divisible by 4 (two stride-2 stages); got {h}x{w}")
        x = inputs = constrain(x.astype(cfg.dtype), GRID)
        norm_relu = lambda t: constrain(nn.relu(normalize(t, cfg)), GRID)
        x = norm_relu(_Conv(cfg, cfg.width, 7, name="stem")(reflect_pad(x, 3)))
        for i in range(2):
            x = norm_relu(_Conv(cfg, cfg.width * 2 ** (i + 1), 3, stride=2, padding=((1, 1), (1, 1)),
                                name=f"down_{i}")(x))
        for i in range(cfg.num_blocks):
            x = ResnetBlock(cfg, deterministic, name=f"block_{i}")(x)
        for i in range(2):
            features = cfg.width * 2 ** (1 - i)
            # = torch ConvTranspose2d(k=3, s=2, p=1, output_padding=1): pad (k-1-p, k-1-p+op) = (1, 2).
            x = nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)), transpose_kernel=True,
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=f"up_{i}",
                                 kernel_init=nn.with_logical_partitioning(_INIT, (None, None, "channels", None)),
                                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)))(x)
            x = norm_relu(x)
        x = _Conv(cfg, c if cfg.channels is None else cfg.channels, 7, zero_init=cfg.residual,
                  name="head")(reflect_pad(x, 3))
        if cfg.residual:
            return constrain(inputs + x, GRID)
        return constrain(jnp.tanh(x) if cfg.output_tanh else x, GRID)


class MLPMapper(nn.Module):
    """Per-token residual MLP: in-projection, `num_blocks` residual FC blocks, out-projection."""
    config: MapperConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        def dense(f, name, axes, init=_INIT):
            return nn.Dense(f, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                            kernel_init=nn.with_logical_partitioning(init, axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
        x = x.astype(cfg.dtype)
        h = nn.relu(dense(cfg.width, "in_proj", ("channels", "mlp"))(x))
        for i in range(cfg.num_blocks):
            r = nn.relu(dense(cfg.width, f"block_{i}_0", ("mlp", None))(h))
            if cfg.dropout:
                r = nn.Dropout(cfg.dropout)(r, deterministic=deterministic)
            h = h + dense(cfg.width, f"block_{i}_1", (None, "mlp"))(r)
        if cfg.residual:
            return x + dense(cfg.channels, "out_proj", ("mlp", "channels"), nn.initializers.zeros)(h)
        out = dense(cfg.channels, "out_proj", ("mlp", "channels"))(h)
        return jnp.tanh(out) if cfg.output_tanh else out


def build_mapper(config: MapperConfig, name: str) -> nn.Module:
    return (ResnetGenerator if config.kind == "resnet" else MLPMapper)(config, name=name)
