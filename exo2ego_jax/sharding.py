"""The one place where logical axis names meet the physical ('data', 'fsdp', 'tensor') mesh.

Every param carries logical names (`nn.with_logical_partitioning`); activations are constrained with the
`activation_*` names. Changing the parallelism of a run means changing these rules or the mesh shape, never
the model code.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Optional[str | tuple[str, ...]]], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # params: FSDP over the model dimension, tensor parallelism over heads / MLP / vocab
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("lora_rank", None),
    ("channels", "tensor"),
)


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry ("fill") and check that the product equals the device count."""
    shape = [int(x) for x in requested]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(requested)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(x == 0 or x < -1 for x in shape):
        raise ValueError(f"mesh shape {tuple(requested)}: use positive sizes and at most one -1")
    known = int(np.prod([x for x in shape if x != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {tuple(requested)} cannot fill {num_devices} devices "
                             f"({num_devices} is not divisible by {known})")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh shape {tuple(shape)} (axes {MESH_AXES}) uses {int(np.prod(shape))} devices but "
                         f"{num_devices} are available; make the product equal the device count or use -1")
    return tuple(shape)


def create_mesh(requested: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(requested, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(boxed_abstract, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a boxed (abstract) param tree from its logical axis names.

    A dimension that its mesh axes do not divide (a tiny test vocab of 97 on a 2-way tensor axis) is
    replicated instead, with a log line, rather than failing deep inside `device_put`.
    """
    import logging

    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_abstract), rules)
    values = nn.meta.unbox(boxed_abstract)

    def fit(spec, value):
        parts = list(spec) + [None] * (len(value.shape) - len(spec))
        for dim, axes in enumerate(parts):
            if axes is None:
                continue
            size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
            if value.shape[dim] % size:
                logging.getLogger(__name__).info("replicating dim %d of a %s param: %d is not divisible by %s=%d",
                                                 dim, value.shape, value.shape[dim], axes, size)
                parts[dim] = None
        return NamedSharding(mesh, PartitionSpec(*parts))

    return jax.tree.map(fit, specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec))
