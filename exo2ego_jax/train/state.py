"""Train state: sharded init (random or from a checkpoint), the trainable/frozen split, abstract shardings.

The state the optimizer owns and the checkpoint holds is `{step, trainable, opt_state, rng}`; frozen params
live beside it (never donated, never checkpointed: they are re-created from the init source on resume).
Trainable params are float32 master weights; frozen params are cast once to `frozen_dtype`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
from jax.sharding import NamedSharding, PartitionSpec

from exo2ego_jax.models import registry
from exo2ego_jax.models.exo2ego import Exo2Ego, Exo2EgoConfig, example_inputs
from exo2ego_jax.models.lora import path_matcher, split_params
from exo2ego_jax.sharding import LOGICAL_AXIS_RULES, logical_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StateLayout:
    """Shardings of everything the train step touches."""
    trainable: Any
    frozen: Any
    opt_state: Any
    state: Any        # {step, trainable, opt_state, rng}
    batch: NamedSharding
    replicated: NamedSharding


def split_tree(flat_tree: dict, is_trainable) -> tuple[dict, dict]:
    return split_params(flat_tree, is_trainable)


def param_shardings(module: Exo2Ego, mesh) -> dict:
    """Unboxed tree of NamedShardings from the params' logical axis names."""
    boxed = registry.abstract_params("exo2ego", module)
    return logical_shardings(boxed, mesh, LOGICAL_AXIS_RULES)


def build_layout(module: Exo2Ego, mesh, spec, tx) -> StateLayout:
    is_trainable = path_matcher(spec.trainable)
    shardings = param_shardings(module, mesh)
    trainable_sh, frozen_sh = split_params(shardings, is_trainable)
    abstract = nn.meta.unbox(registry.abstract_params("exo2ego", module))
    trainable_abs, _ = split_params(abstract, is_trainable)
    trainable_abs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), trainable_abs)
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abs, trainable_sh,
                                   transform_non_params=lambda _: replicated)
    state_sh = dict(step=replicated, trainable=trainable_sh, opt_state=opt_sh, rng=replicated)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return StateLayout(trainable_sh, frozen_sh, opt_sh, state_sh, batch, replicated)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def init_params(module: Exo2Ego, mesh, layout: StateLayout, spec, *, seed: int, frozen_dtype: str,
                checkpoint: Optional[str] = None):
    """(trainable float32, frozen in frozen_dtype), created directly in their shardings."""
    is_trainable = path_matcher(spec.trainable)
    out_sh = (layout.trainable, layout.frozen)

    def split_cast(params):
        trainable, frozen = split_params(params, is_trainable)
        return _cast(trainable, jnp.float32), _cast(frozen, jnp.dtype(frozen_dtype))

    if checkpoint is None:
        cfg = module.config

        def init(key):
            params = module.init(key, *example_inputs(cfg), method="init_all")["params"]
            return split_cast(nn.meta.unbox(params))

        with jax.set_mesh(mesh):
            return jax.jit(init, out_shardings=out_sh)(jax.random.key(seed))
    from exo2ego_jax.checkpoints import load_pretrained
    overrides = runtime_overrides(module.config)
    _, params = load_pretrained(checkpoint, mesh=mesh, lora_seed=seed, **overrides)
    with jax.set_mesh(mesh):
        return jax.jit(split_cast, out_shardings=out_sh)(params)


def runtime_overrides(cfg: Exo2EgoConfig) -> dict:
    """Fields of the training config that apply on top of a checkpoint's architecture."""
    return dict(
        clip=dict(dtype=cfg.clip.dtype, scan_layers=cfg.clip.scan_layers, remat_policy=cfg.clip.remat_policy,
                  attention_impl=cfg.clip.attention_impl),
        llm=dict(dtype=cfg.llm.dtype, scan_layers=cfg.llm.scan_layers, remat_policy=cfg.llm.remat_policy,
                 attention_impl=cfg.llm.attention_impl, lora=cfg.llm.lora),
        stc=dict(dtype=cfg.stc.dtype), mapper=dict(dtype=cfg.mapper.dtype),
        fusion=cfg.fusion, length_buckets=cfg.length_buckets)


def checkpoint_model_config(path: str, cfg: Exo2EgoConfig) -> Exo2EgoConfig:
    """The checkpoint's architecture with this run's runtime fields (dtype, scan, remat, LoRA, fusion)."""
    from exo2ego_jax.checkpoints import read_model_config
    meta = read_model_config(path)
    if meta["kind"] != "exo2ego":
        raise ValueError(f"init checkpoint {path!r} holds a {meta['kind']!r} model; stages start from an exo2ego "
                         "checkpoint (python -m exo2ego_jax.convert videollama2 ...) or a previous stage's export")
    return registry.config_from_dict("exo2ego", meta["config"], **runtime_overrides(cfg))


def new_state(trainable, tx, layout: StateLayout, mesh, seed: int):
    def make(trainable):
        return dict(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                    rng=jax.random.key_data(jax.random.key(seed + 1)))
    with jax.set_mesh(mesh):
        return jax.jit(make, out_shardings=layout.state, donate_argnums=0)(trainable)


def abstract_state(state_like, layout: StateLayout):
    """ShapeDtypeStructs carrying the target shardings (for Orbax restores)."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state_like, layout.state)
