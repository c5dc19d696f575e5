"""Exo2Ego's losses: VTG (next-token cross-entropy), cycle consistency (L1) and KL between feature spaces.

The paper gives the cycle loss's formula, E|G(F(x)) - x|_1 + E|F(G(y)) - y|_1, and says only that the KL term
aligns the distribution of real exo features y with the mapped F(x). How that distribution is formed, the
direction and the weights are our choices (config fields, defaults documented in the README):
  kl_mode "tokens": softmax over channels of each patch token, token (i, j) of y against token (i, j) of F(x).
                    This pairs the same grid position of two different cameras, so it assumes the views are
                    spatially aligned, which they are not.
  kl_mode "pooled": softmax over channels of each frame's mean feature (the patch grid pooled away): compares
                    what is in the frame, not where; no spatial alignment assumed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from exo2ego_jax.constants import IGNORE_INDEX
from exo2ego_jax.errors import ConfigError, check_choice

KL_DIRECTIONS = ("exo_to_mapped", "mapped_to_exo")  # KL(y || F(x)) (our default: the target distribution is
                                                      # the real exo one, as in distillation) or KL(F(x) || y)
# How the pointwise terms p (log p - log q) are reduced. "token_mean": summed over channels, averaged over tokens
# (or frames, for kl_mode "pooled"), i.e. the mean KL of one token's distribution, our default, whose size does not
# depend on the clip's length or grid. The other three are torch.nn.functional.kl_div's reductions, for ports of
# PyTorch configs: "batchmean" sums everything and divides by the batch size only (T x P = 9216 times a
# token_mean at 7b), "sum" sums everything, "mean" averages over every element (channels too).
KL_REDUCTIONS = ("token_mean", "batchmean", "sum", "mean")
KL_MODES = ("tokens", "pooled")
CYCLES = ("both", "forward", "none")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    vtg_weight: float = 1.0
    cycle_weight: float = 1.0
    kl_weight: float = 1.0
    cycle: str = "both"           # "forward": only |G(F(x)) - x|; "none": w/o G and CCL
    use_kl: bool = True
    kl_temperature: float = 1.0
    kl_direction: str = "exo_to_mapped"
    kl_reduction: str = "token_mean"  # see KL_REDUCTIONS (x tau^2 in every case)
    kl_mode: str = "tokens"
    detach_cycle_targets: bool = False  # True: |G(F(x)) - sg(x)| (the paper's formula has no stop-gradient)

    def __post_init__(self):
        check_choice("loss.cycle", self.cycle, CYCLES)
        check_choice("loss.kl_direction", self.kl_direction, KL_DIRECTIONS)
        check_choice("loss.kl_reduction", self.kl_reduction, KL_REDUCTIONS)
        check_choice("loss.kl_mode", self.kl_mode, KL_MODES)
        if self.kl_temperature <= 0:
            raise ConfigError(f"config field 'loss.kl_temperature' must be > 0, got {self.kl_temperature}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def vtg_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX):
    """Shifted next-token cross-entropy, mean over non-ignored targets. Returns (loss, number of targets)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != ignore_index
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    count = valid.sum()
    return jnp.sum(ce * valid) / jnp.maximum(count, 1), count


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def feature_kl(y: jax.Array, fx: jax.Array, *, temperature: float = 1.0, direction: str = "exo_to_mapped",
               reduction: str = "token_mean", mode: str = "tokens") -> jax.Array:
    """KL between softmax(./tau) over channels of y (real exo) and F(x), times tau^2.

    y, fx: [B, ..., P, C] features (P patch tokens). `mode="tokens"` compares token by token; `"pooled"` compares
    the means over the P tokens (one distribution per frame). `reduction`: see KL_REDUCTIONS.
    """
    y, fx = _kl_inputs(y, mode), _kl_inputs(fx, mode)
    log_p = jax.nn.log_softmax(y / temperature, axis=-1)
    log_q = jax.nn.log_softmax(fx / temperature, axis=-1)
    if direction == "mapped_to_exo":
        log_p, log_q = log_q, log_p
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # per token (or frame)
    value = {"token_mean": lambda: jnp.mean(kl), "batchmean": lambda: jnp.sum(kl) / y.shape[0],
             "sum": lambda: jnp.sum(kl), "mean": lambda: jnp.mean(kl) / y.shape[-1]}[reduction]()
    return value * temperature ** 2


def _kl_inputs(features: jax.Array, mode: str) -> jax.Array:
    features = features.astype(jnp.float32)
    return jnp.mean(features, axis=-2) if mode == "pooled" else features


def kl_target_stats(y: jax.Array, *, temperature: float = 1.0, mode: str = "tokens") -> dict:
    """How peaked the KL's target softmax(y / tau) over channels is: `kl_target_entropy` (mean entropy, nats; a
    uniform target over C channels has log C) and `kl_target_top_mass` (mean probability of its largest channel;
    near 1 the target is almost one-hot, as a few very large channels make it at tau = 1)."""
    log_p = jax.nn.log_softmax(_kl_inputs(y, mode) / temperature, axis=-1)
    p = jnp.exp(log_p)
    return {"kl_target_entropy": jnp.mean(-jnp.sum(p * log_p, axis=-1)),
            "kl_target_top_mass": jnp.mean(jnp.max(p, axis=-1))}
