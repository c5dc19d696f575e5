"""Dense layers with optional low-rank adapters (LoRA), and merging adapters into their kernels.

The adapters are explicit siblings of the frozen kernel in the same `params` tree (`kernel`, `lora_a`,
`lora_b`), so a base checkpoint loads unchanged and trainable/frozen sets are chosen by path regex.
Numerics follow peft's `lora.Linear`: y = x W + b + dropout(x) A B * (alpha / rank); A is initialised
kaiming-uniform(a=sqrt(5)) (i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and B with zeros, so a fresh adapter is
the identity. The merged kernel is never materialised in the forward pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from exo2ego_jax.models.params import as_dict

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter settings; the defaults are Exo2Ego's stage 3 (r=128, alpha=256, dropout 0.1)."""
    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora.targets has unknown modules {sorted(unknown)}; allowed: {list(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, target: str) -> bool:
        return target in self.targets


def peft_kaiming_uniform(key, shape, dtype=jnp.float32):
    """peft's lora_A init, kaiming_uniform_(a=sqrt(5)), for a flax [in, rank] kernel: U(+-1/sqrt(in))."""
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRADense(nn.Module):
    """`nn.Dense` with logical axis names and an optional LoRA adapter.

    `lora=None` (or a target not in `lora.targets`) builds a plain dense layer whose params are exactly
    `kernel` (and `bias`), so checkpoints are shared between the two.
    """
    features: int
    kernel_axes: tuple[str | None, str | None]
    use_bias: bool = False
    lora: LoRAConfig | None = None
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (in_features, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None:
            a = self.param("lora_a", nn.with_logical_partitioning(peft_kaiming_uniform,
                                                                  (self.kernel_axes[0], "lora_rank")),
                           (in_features, self.lora.rank), self.param_dtype)
            b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("lora_rank", self.kernel_axes[1])),
                           (self.lora.rank, self.features), self.param_dtype)
            h = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
            # Two thin matmuls (x A) B: never forms the [in, out] update.
            y = y + jnp.dot(jnp.dot(h, a.astype(self.dtype)), b.astype(self.dtype)) * jnp.asarray(
                self.lora.scale, self.dtype)
        return y


# ----------------------------------------------------------------------------------------------------------
# Adapters in plain (unboxed) param trees.


def merge_lora(params: dict, scale: float) -> dict:
    """Fold every adapter into its kernel: W' = W + A B * scale; `lora_a`/`lora_b` disappear.

    Works on scanned stacks too (a leading layer axis on kernel, A and B). The merged kernel keeps the
    base kernel's dtype, with the update computed in float32.
    """
    def visit(node):
        if not isinstance(node, dict):
            return node
        node = {k: visit(v) for k, v in node.items()}
        if "lora_a" in node and "lora_b" in node:
            a, b = node.pop("lora_a"), node.pop("lora_b")
            kernel = node["kernel"]
            update = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
            node["kernel"] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
        return node
    return visit(as_dict(params))


def is_lora_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")
