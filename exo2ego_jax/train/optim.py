"""AdamW with warmup + cosine (or linear/constant) decay, global-norm clipping, no decay on norms/biases."""
from __future__ import annotations

import optax
from flax import traverse_util

from exo2ego_jax.models.params import path_matcher


def learning_rate_schedule(optim, total_steps: int):
    """HF's schedules (get_{cosine,linear,constant}_schedule_with_warmup): lr = peak * step / warmup during the
    warmup, then the decay to 0 at `total_steps`."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    peak = optim.learning_rate
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)
    if optim.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params, patterns):
    no_decay = path_matcher(patterns)
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: not no_decay(k) for k in flat}, sep="/")


def make_optimizer(optim, total_steps: int):
    """-> (optax transform over the trainable params, learning-rate schedule)."""
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                             mask=lambda p: decay_mask(p, tuple(optim.no_decay))))
    return optax.chain(*parts), schedule
