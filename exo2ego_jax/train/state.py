"""Train state: sharded init (random or from a checkpoint), the trainable/frozen split, abstract shardings.

The state the optimizer owns and the checkpoint holds is `{step, trainable, opt_state, rng}`; frozen params
live beside it (never donated, never checkpointed: they are re-created from the init source on resume).
Trainable params are float32 master weights; frozen params are cast once to `frozen_dtype`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from exo2ego_jax.checkpoints import load_pretrained
from exo2ego_jax.models import registry
from exo2ego_jax.models.exo2ego import Exo2Ego, Exo2EgoConfig, example_inputs, init_submodule
from exo2ego_jax.models.params import path_matcher, split_params
from exo2ego_jax.errors import check_choice
from exo2ego_jax.sharding import FROZEN_LAYOUTS, logical_shardings, replicate
from exo2ego_jax.train.config import SECTION_MODULES, Run


@dataclasses.dataclass
class StateLayout:
    """Shardings of everything the train step touches."""
    trainable: Any
    frozen: Any
    opt_state: Any
    state: Any        # {step, trainable, opt_state, rng}
    batch: NamedSharding
    replicated: NamedSharding


def param_shardings(module: Exo2Ego, mesh) -> dict:
    """Unboxed tree of NamedShardings from the params' logical axis names (`sharding.rules_for(mesh)`)."""
    return logical_shardings(registry.abstract_params("exo2ego", module), mesh)


def abstract_trainable_frozen(module: Exo2Ego, spec, frozen_dtype: str) -> tuple[dict, dict]:
    """ShapeDtypeStructs of (trainable float32, frozen in frozen_dtype), computed without FLOPs."""
    abstract = nn.meta.unbox(registry.abstract_params("exo2ego", module))
    trainable, frozen = split_params(abstract, path_matcher(spec.trainable))
    as_dtype = lambda dtype: (lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)))
    return jax.tree.map(as_dtype(jnp.float32), trainable), jax.tree.map(as_dtype(frozen_dtype), frozen)


def build_layout(module: Exo2Ego, mesh, spec, tx, *, frozen_layout: str = "fsdp") -> StateLayout:
    """Shardings of the state: trainable params and their optimizer state by the logical rules (FSDP);
    frozen params the same (`frozen_layout="fsdp"`: gathered where they are used) or whole on every device
    (`"replicated"`: more memory, no collectives for them)."""
    is_trainable = path_matcher(spec.trainable)
    trainable_sh, frozen_sh = split_params(param_shardings(module, mesh), is_trainable)
    check_choice("sharding.frozen", frozen_layout, FROZEN_LAYOUTS)
    if frozen_layout == "replicated":
        frozen_sh = replicate(frozen_sh, mesh)
    trainable_abs, _ = abstract_trainable_frozen(module, spec, "float32")
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    whole = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abs, trainable_sh, transform_non_params=lambda _: whole)
    state_sh = dict(step=whole, trainable=trainable_sh, opt_state=opt_sh, rng=whole)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return StateLayout(trainable_sh, frozen_sh, opt_sh, state_sh, batch, whole)


def runtime_overrides(cfg: Exo2EgoConfig, skip_sections: tuple[str, ...] = ()) -> dict:
    """Fields of the run's model config that apply on top of a checkpoint's architecture."""
    sections = dict(
        clip=dict(dtype=cfg.clip.dtype, scan_layers=cfg.clip.scan_layers, remat_policy=cfg.clip.remat_policy,
                  attention_impl=cfg.clip.attention_impl),
        llm=dict(dtype=cfg.llm.dtype, scan_layers=cfg.llm.scan_layers, remat_policy=cfg.llm.remat_policy,
                 attention_impl=cfg.llm.attention_impl, lora=cfg.llm.lora),
        stc=dict(dtype=cfg.stc.dtype), mapper=dict(dtype=cfg.mapper.dtype, dropout=cfg.mapper.dropout))
    out = {k: v for k, v in sections.items() if k not in skip_sections}
    return dict(out, fusion=cfg.fusion, length_buckets=cfg.length_buckets, num_frames=cfg.num_frames)


def init_params(run: Run, module: Exo2Ego, mesh, layout: StateLayout, *, seed: int, frozen_dtype: str):
    """(trainable float32, frozen in frozen_dtype), created directly in their shardings.

    From `run.init_path` when set (modules named in `init.reinit` get a fresh seeded init), else a seeded
    random init of the whole composite, whose exo encoder is a copy of the ego encoder when
    `init.shared_tower` (both towers start from one CLIP, as a converted VideoLLaMA2 checkpoint has them).
    """
    spec = run.stage
    is_trainable = path_matcher(spec.trainable)
    out_sh = (layout.trainable, layout.frozen)

    def split_cast(params):
        trainable, frozen = split_params(params, is_trainable)
        return (jax.tree.map(lambda x: x.astype(jnp.float32), trainable),
                jax.tree.map(lambda x: x.astype(jnp.dtype(frozen_dtype)), frozen))

    if run.init_path is None:
        shared_tower = bool(run.config.init.shared_tower)

        def init(key):
            params = nn.meta.unbox(module.init(key, *example_inputs(module.config), method="init_all")["params"])
            if shared_tower:
                params = dict(params, exo_encoder=params["ego_encoder"])
            return split_cast(params)

        with jax.set_mesh(mesh):
            return jax.jit(init, out_shardings=out_sh)(jax.random.key(seed))

    reinit = tuple(run.config.init.reinit)
    kept_sections = tuple(s for s, mods in SECTION_MODULES.items() if set(mods) <= set(reinit))
    _, params = load_pretrained(run.init_path, mesh=mesh, lora_seed=seed,
                                **runtime_overrides(module.config, skip_sections=kept_sections))
    params = dict(params)
    key = jax.random.key(seed + 7919)  # a stream of its own, so a reinit never repeats another init
    for i, name in enumerate(reinit):
        params[name] = nn.meta.unbox(init_submodule(module.config, name, jax.random.fold_in(key, i)))
    with jax.set_mesh(mesh):
        return jax.jit(split_cast, out_shardings=out_sh)(params)


def new_state(trainable, tx, layout: StateLayout, mesh, seed: int):
    def make(trainable):
        return dict(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                    rng=jax.random.key_data(jax.random.key(seed + 1)))
    with jax.set_mesh(mesh):
        return jax.jit(make, out_shardings=layout.state, donate_argnums=0)(trainable)


def abstract_state(state_like, layout: StateLayout):
    """ShapeDtypeStructs carrying the target shardings (for Orbax restores and ahead-of-time compiles)."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state_like, layout.state)


def param_count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))

