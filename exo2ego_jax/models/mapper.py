"""Mapping functions F (ego -> exo) and G (exo -> ego) on per-frame CLIP patch grids.

`resnet`: the CycleGAN `resnet_9blocks` generator (reflection-padded 7x7 stem, two stride-2 convs, residual
blocks, two transposed-conv upsamplers, 7x7 head), instance norm without affine params, no output tanh by
default since CLIP features are unbounded. `mlp`: the paper's "FC layers instead of ResNet blocks" ablation,
a per-token residual MLP. Both map [N, h, w, C] -> [N, h, w, C] (h, w divisible by 4 for `resnet`).
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


@dataclasses.dataclass(frozen=True)
class MapperConfig:
    kind: str = "resnet"
    channels: int = 1024      # CLIP width in = out
    width: int = 256          # ngf: stem width (x2, x4 after the downsamplers); MLP hidden width for `mlp`
    num_blocks: int = 9
    output_tanh: bool = False
    dropout: float = 0.0      # CycleGAN's use_dropout (0.5 there) inside residual blocks
    norm_eps: float = 1e-5
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        check_choice("mapper.kind", self.kind, MAPPER_KINDS)
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


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class _Conv(nn.Module):
    config: MapperConfig
    features: int
    kernel: int
    stride: int = 1
    padding: Any = "VALID"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=self.padding,
                       use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="conv",
                       kernel_init=nn.with_logical_partitioning(_INIT, (None, None, None, "channels")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)))(x)


class ResnetBlock(nn.Module):
    config: MapperConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        c = x.shape[-1]
        h = _Conv(cfg, c, 3, name="conv_0")(reflect_pad(x, 1))
        h = nn.relu(instance_norm(h, cfg.norm_eps))
        if cfg.dropout:
            h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = _Conv(cfg, c, 3, name="conv_1")(reflect_pad(h, 1))
        return constrain(x + instance_norm(h, cfg.norm_eps), GRID)


class ResnetGenerator(nn.Module):
    config: MapperConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        n, h, w, c = x.shape
        if h % 4 or w % 4:
            raise ValueError(f"the resnet mapper needs a grid divisible by 4 (two stride-2 stages); got {h}x{w}")
        x = constrain(x.astype(cfg.dtype), GRID)
        norm_relu = lambda t: constrain(nn.relu(instance_norm(t, cfg.norm_eps)), GRID)
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
        x = _Conv(cfg, c if cfg.channels is None else cfg.channels, 7, name="head")(reflect_pad(x, 3))
        return constrain(jnp.tanh(x) if cfg.output_tanh else x, GRID)


class MLPMapper(nn.Module):
    """Per-token residual MLP: in-projection, `num_blocks` residual FC blocks, out-projection."""
    config: MapperConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        dense = lambda f, name, axes: nn.Dense(f, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                                               kernel_init=nn.with_logical_partitioning(_INIT, axes),
                                               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
        h = nn.relu(dense(cfg.width, "in_proj", ("channels", "mlp"))(x.astype(cfg.dtype)))
        for i in range(cfg.num_blocks):
            r = nn.relu(dense(cfg.width, f"block_{i}_0", ("mlp", None))(h))
            if cfg.dropout:
                r = nn.Dropout(cfg.dropout)(r, deterministic=deterministic)
            h = h + dense(cfg.width, f"block_{i}_1", (None, "mlp"))(r)
        out = dense(cfg.channels, "out_proj", ("mlp", "channels"))(h)
        return jnp.tanh(out) if cfg.output_tanh else out


def build_mapper(config: MapperConfig, name: str) -> nn.Module:
    return (ResnetGenerator if config.kind == "resnet" else MLPMapper)(config, name=name)
