"""VideoLLaMA2's STC connector (`stc_connector`) in Flax, channels-last.

RegStage(4 bottlenecks, encoder width -> LLM width) per frame, a Conv3d (kernel = stride = 2, padding 1) + SiLU
over (time, height, width), a second RegStage, then a Linear-GELU-Linear readout. Numerics follow timm 1.0.3's
`RegStage` / `Bottleneck` built with `act_layer=SiLU, norm_layer=LayerNorm2d` (whose norm-act variant,
`LayerNormAct2d`, uses eps 1e-5) exactly as VideoLLaMA2 builds them. Param names mirror the PyTorch module
tree (`s1/b1/conv1/conv`, `.../bn`, `sampler`, `readout_0`), so the converter is a plain renaming.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from exo2ego_jax.errors import check_choice
from exo2ego_jax.models.layers import GRID, constrain

STC_VARIANTS = {"stc": 1, "stc_v35": 0}  # variant -> Conv3d padding


@dataclasses.dataclass(frozen=True)
class STCConfig:
    encoder_hidden_size: int = 1024
    hidden_size: int = 4096
    depth: int = 4
    downsample: tuple[int, int, int] = (2, 2, 2)
    variant: str = "stc"   # "stc": padding 1 (1521 tokens for 16x24x24); "stc_v35": padding 0 (1152)
    se_ratio: float = 0.25
    norm_eps: float = 1e-5
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        check_choice("stc.variant", self.variant, STC_VARIANTS)
        object.__setattr__(self, "downsample", tuple(self.downsample))

    @property
    def padding(self) -> int:
        return STC_VARIANTS[self.variant]

    def output_grid(self, frames: int, grid: int) -> tuple[int, int, int]:
        """(t, h, w) of the tokens for `frames` frames of a grid x grid patch map (tokens in that order)."""
        t, h, w = (_conv_out(n, k, self.padding) for n, k in zip((frames, grid, grid), self.downsample))
        return t, h, w

    def num_tokens(self, frames: int, grid: int) -> int:
        t, h, w = self.output_grid(frames, grid)
        return t * h * w

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _conv_out(n: int, k: int, pad: int) -> int:
    return (n + 2 * pad - k) // k + 1


def _conv(cfg, features, kernel, name, groups=1, use_bias=False, axes=(None, None, None, "channels")):
    return nn.Conv(features, kernel, padding="SAME" if kernel[0] > 1 else "VALID", feature_group_count=groups,
                   use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv (stride 1, zero 'SAME' padding, no bias) as a sum of k*k shifted products.

    Same params and numerics as `nn.Conv(feature_group_count=C)`, but without a grouped convolution: XLA's SPMD
    partitioner returns wrong kernel gradients for grouped convs when the batch is sharded over several mesh
    axes and the channels over another (reproduced on CPU with jax 0.10.2: mesh (2, 2, 2), relative error 1.0).
    """
    config: STCConfig
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x):
        cfg, k = self.config, self.kernel_size
        c = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   (None, None, None, "channels")),
                            (k, k, 1, c), cfg.param_dtype).astype(cfg.dtype)
        x = x.astype(cfg.dtype)
        h, w = x.shape[1:3]
        pad = k // 2
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out = xp[:, 0:h, 0:w, :] * kernel[0, 0, 0]
        for i in range(k):
            for j in range(k):
                if i or j:
                    out = out + xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
        return out


class ConvNormAct(nn.Module):
    """timm ConvNormAct: conv (no bias) -> LayerNorm over channels (named `bn`) -> optional SiLU."""
    config: STCConfig
    features: int
    kernel: int = 1
    groups: int = 1
    apply_act: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if self.groups == 1:
            x = _conv(cfg, self.features, (self.kernel, self.kernel), "conv")(x)
        elif self.groups == self.features == x.shape[-1]:
            x = DepthwiseConv(cfg, self.kernel, name="conv")(x)
        else:
            raise ValueError(f"grouped conv with {self.groups} groups is not used by the STC connector")
        x = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="bn",
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("channels",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)))(x)
        return nn.silu(x) if self.apply_act else x


class SqueezeExcite(nn.Module):
    config: STCConfig
    rd_channels: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.silu(_conv(cfg, self.rd_channels, (1, 1), "fc1", use_bias=True)(s))
        s = _conv(cfg, x.shape[-1], (1, 1), "fc2", use_bias=True)(s)
        return x * jax.nn.sigmoid(s)


class Bottleneck(nn.Module):
    """timm regnet Bottleneck with bottle_ratio 1, group size 1 (depthwise 3x3), SE on the input width."""
    config: STCConfig
    out_channels: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        in_channels = x.shape[-1]
        shortcut = x
        x = ConvNormAct(cfg, self.out_channels, 1, name="conv1")(x)
        x = ConvNormAct(cfg, self.out_channels, 3, groups=self.out_channels, name="conv2")(x)
        x = SqueezeExcite(cfg, int(round(in_channels * cfg.se_ratio)), name="se")(x)
        x = ConvNormAct(cfg, self.out_channels, 1, apply_act=False, name="conv3")(x)
        if in_channels != self.out_channels:
            shortcut = ConvNormAct(cfg, self.out_channels, 1, apply_act=False, name="downsample")(shortcut)
        return constrain(nn.silu(x + shortcut), GRID)


class RegStage(nn.Module):
    config: STCConfig
    out_channels: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.depth):
            x = Bottleneck(self.config, self.out_channels, name=f"b{i + 1}")(x)
        return x


class STCConnector(nn.Module):
    """CLIP patch features [B, T, P, C] (P = h*w) -> LLM-space tokens [B, T'*h'*w', D] in (t, h, w) order."""
    config: STCConfig

    @nn.compact
    def __call__(self, features: jax.Array, segments: int = 1) -> jax.Array:
        """`segments` > 1: the T frames are that many clips laid end to end (x then F(x) under fusion "frames");
        the temporal sampler pads and strides each on its own, so no sampler window spans two of them."""
        cfg = self.config
        b, t, p, c = features.shape
        if t % segments:
            raise ValueError(f"STC: {t} frames cannot be split into {segments} equal segments")
        hw = int(round(p ** 0.5))
        if hw * hw != p or c != cfg.encoder_hidden_size:
            raise ValueError(f"STC expects features [B, T, h*w, {cfg.encoder_hidden_size}] on a square grid; "
                             f"got {tuple(features.shape)}")
        x = constrain(features.astype(cfg.dtype).reshape(b * t, hw, hw, c), GRID)
        x = RegStage(cfg, cfg.hidden_size, name="s1")(x)
        x = x.reshape(b * segments, t // segments, hw, hw, cfg.hidden_size)
        pad = cfg.padding
        x = nn.Conv(cfg.hidden_size, cfg.downsample, strides=cfg.downsample, padding=[(pad, pad)] * 3,
                    use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="sampler",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, None, None, "channels")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)))(x)
        x = nn.silu(x)
        x = x.reshape((b, -1) + x.shape[2:])  # the segments' windows back to back, in time order
        _, nt, nh, nw, d = x.shape
        x = RegStage(cfg, cfg.hidden_size, name="s2")(x.reshape(b * nt, nh, nw, d))
        x = constrain(x.reshape(b, nt * nh * nw, d), ("activation_batch", "activation_length", "activation_embed"))
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                               ("embed", "mlp")),
                                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
        x = dense("readout_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return dense("readout_2")(x)
