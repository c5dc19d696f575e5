"""One jit-compiled train step per stage (explicit shardings, donated state), and an eval step.

Gradient accumulation runs inside the step: the global batch is split into `microbatches` interleaved
slices (row i goes to microbatch i % M, so every device contributes equally to each) scanned with
`lax.scan`; gradients are averaged, then clipped and applied once.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from exo2ego_jax.losses import LossConfig
from exo2ego_jax.models.params import combine_params
from exo2ego_jax.train.batches import MODEL_INPUTS
from exo2ego_jax.train.stages import StageSpec, stage_loss


def _split_microbatches(batch: dict, m: int) -> dict:
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(module, spec: StageSpec, loss_cfg: LossConfig, tx, schedule, *, microbatches: int,
                    compute_dtype, rules=()) -> Callable:
    """step(state, frozen, batch) -> (state, metrics); metrics are scalars (means over microbatches).

    `rules` (logical -> mesh axes, `sharding.rules_for(mesh)`) pin the activations' layout while tracing.
    """
    compute_dtype = jnp.dtype(compute_dtype)

    def loss_fn(trainable, frozen, batch, rng):
        params = combine_params(jax.tree.map(lambda p: p.astype(compute_dtype), trainable), frozen)
        with nn.logical_axis_rules(rules):
            return stage_loss(module, params, batch, spec, loss_cfg, rng=rng, deterministic=False)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        batch = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        trainable = state["trainable"]
        if microbatches == 1:
            (_, metrics), grads = grad_fn(trainable, frozen, batch, step_rng)
        else:
            micro = _split_microbatches(batch, microbatches)
            rngs = jax.random.split(step_rng, microbatches)

            def body(acc, xs):
                mb, r = xs
                (_, m), g = grad_fn(trainable, frozen, mb, r)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.eval_shape(lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], micro), rngs[0]))
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
            (grads, metrics), _ = jax.lax.scan(body, init, (micro, rngs))
            grads = jax.tree.map(lambda g: g / microbatches, grads)
            metrics = {k: (v if k == "num_targets" else v / microbatches) for k, v in metrics.items()}
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], trainable)
            new_trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))
        new_state = dict(step=state["step"] + 1, trainable=new_trainable, opt_state=opt_state,
                         rng=jax.random.key_data(rng))
        return new_state, metrics

    return step


def make_eval_step(module, spec: StageSpec, loss_cfg: LossConfig, *, compute_dtype, rules=()) -> Callable:
    compute_dtype = jnp.dtype(compute_dtype)

    def eval_step(trainable, frozen, batch):
        batch = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        params = combine_params(jax.tree.map(lambda p: p.astype(compute_dtype), trainable), frozen)
        with nn.logical_axis_rules(rules):
            return stage_loss(module, params, batch, spec, loss_cfg, deterministic=True)[1]

    return eval_step


def jit_train_step(step, layout, metrics_sharding=None):
    return jax.jit(step, in_shardings=(layout.state, layout.frozen, layout.batch),
                   out_shardings=(layout.state, metrics_sharding or layout.replicated), donate_argnums=(0,))


def jit_eval_step(eval_step, layout):
    return jax.jit(eval_step, in_shardings=(layout.trainable, layout.frozen, layout.batch),
                   out_shardings=layout.replicated)
