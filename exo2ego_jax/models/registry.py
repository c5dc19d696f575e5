"""Model kinds known to the converters and to `load_pretrained`: config class, module, example inputs."""
from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from exo2ego_jax.errors import CheckpointError
from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionEncoder
from exo2ego_jax.models.exo2ego import Exo2Ego, Exo2EgoConfig, example_inputs
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mistral import MistralConfig, MistralForCausalLM


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    config_cls: type
    module_cls: type
    example_inputs: Callable[[Any], tuple]  # config -> positional args of module.init
    init_method: Any = None                 # method that touches every param (default: __call__)
    from_dict: Any = None                   # config dict -> config (default: config_cls(**d))


MODEL_KINDS: dict[str, ModelSpec] = {
    "clip": ModelSpec(CLIPVisionConfig, CLIPVisionEncoder,
                      lambda c: (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)),
    "mistral": ModelSpec(MistralConfig, MistralForCausalLM, lambda c: (jnp.zeros((1, 1), jnp.int32),)),
    "exo2ego": ModelSpec(Exo2EgoConfig, Exo2Ego, example_inputs, init_method="init_all",
                         from_dict=Exo2EgoConfig.from_dict),
}


def spec_for(kind: str) -> ModelSpec:
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; known kinds: {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def config_from_dict(kind: str, values: dict, **overrides):
    """Rebuild a config dataclass from its `to_dict()` form (as stored in model_config.json)."""
    spec = spec_for(kind)
    if spec.from_dict is not None:
        return spec.from_dict(values, **overrides)
    cls = spec.config_cls
    values = {**values, **overrides}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
    if isinstance(values.get("lora"), dict):
        lora = values["lora"]
        values["lora"] = LoRAConfig(**{**lora, "targets": tuple(lora.get("targets", LoRAConfig.targets))})
    return cls(**values)


def build_module(kind: str, config) -> nn.Module:
    return spec_for(kind).module_cls(config)


def abstract_params(kind: str, module: nn.Module) -> dict:
    """Boxed abstract params (ShapeDtypeStruct leaves inside LogicallyPartitioned), computed without FLOPs."""
    spec = spec_for(kind)
    kwargs = {"method": spec.init_method} if spec.init_method else {}
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *spec.example_inputs(module.config), **kwargs))
    return variables["params"]


def flat_shapes(boxed_params: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """'/'-joined path -> ShapeDtypeStruct of an (abstract) boxed param tree."""
    return traverse_util.flatten_dict(nn.meta.unbox(boxed_params), sep="/")
