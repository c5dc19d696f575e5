"""The one place where logical axis names meet the physical ('data', 'fsdp', 'tensor') mesh.

Every param carries logical names (`nn.with_logical_partitioning`); activations are constrained with the
`activation_*` names (`models.layers.constrain`), which take effect under `nn.logical_axis_rules(rules)` and a
mesh (the train step sets both). Changing the parallelism of a run means changing these rules or the mesh
shape, never the model code.

Params: FSDP over the model dimension (`embed` -> fsdp); with a tensor axis, Megatron-style tensor parallelism
over heads / MLP / vocab / conv channels. Without one (tensor = 1), those dimensions shard over fsdp instead
when the param has no `embed` dimension (conv kernels, LoRA B, norms), so no large trainable tensor is
replicated. Activations: batch over (data, fsdp), heads and MLP over tensor.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from exo2ego_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
FROZEN_LAYOUTS = ("fsdp", "replicated")
_PARAM_DIMS = ("vocab", "mlp", "heads", "kv_heads", "channels")

log = logging.getLogger(__name__)

ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_channels", None),
)


def logical_rules(tensor_parallel: bool = True) -> tuple:
    """Logical -> mesh axis rules; first match wins per dimension and a mesh axis is used once per array."""
    second = "tensor" if tensor_parallel else "fsdp"
    return ACTIVATION_RULES + (("layers", None), ("lora_rank", None), ("embed", "fsdp")) + tuple(
        (name, second) for name in _PARAM_DIMS)


LOGICAL_AXIS_RULES = logical_rules(tensor_parallel=True)


def rules_for(mesh: Mesh) -> tuple:
    """The rules a mesh uses: tensor parallelism when its tensor axis is larger than 1, else FSDP everywhere."""
    return logical_rules(tensor_parallel=mesh.shape.get("tensor", 1) > 1)


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry ("fill") and check that the product equals the device count."""
    shape = [int(x) for x in requested]
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"config field 'mesh.shape': {tuple(requested)} must have {len(MESH_AXES)} entries for "
                          f"axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(x == 0 or x < -1 for x in shape):
        raise ConfigError(f"config field 'mesh.shape': {tuple(requested)}: use positive sizes and at most one -1")
    known = int(np.prod([x for x in shape if x != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"config field 'mesh.shape': {tuple(requested)} cannot fill {num_devices} devices "
                              f"({num_devices} is not divisible by {known})")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(f"config field 'mesh.shape': {tuple(shape)} (axes {MESH_AXES}) uses {int(np.prod(shape))} "
                          f"devices but {num_devices} are available; make the product equal the device count or "
                          "use -1")
    return tuple(shape)


def create_mesh(requested: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """The mesh over `devices`. TPU devices are laid out by their physical coordinates (`mesh_utils`), so that
    neighbouring mesh positions are ICI neighbours; across several slices the data axis spans the slices (the
    only axis whose traffic, one gradient reduction per step, suits the slower DCN)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(requested, len(devices))
    if devices[0].platform != "tpu":
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    from jax.experimental import mesh_utils
    slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
    if slices == 1:
        return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES)
    data, fsdp, tensor = shape
    if data % slices:
        if data != 1 or fsdp % slices:
            raise ConfigError(f"config field 'mesh.shape': {shape} over {slices} slices: the data axis must be a "
                              f"multiple of the slice count (it spans the slices), e.g. ({slices}, -1, {tensor})")
        log.info("mesh %s over %d slices: the data axis spans the slices, fsdp within each", shape, slices)
        data, fsdp = slices, fsdp // slices
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def logical_shardings(boxed_abstract, mesh: Mesh, rules=None):
    """NamedShardings for a boxed (abstract) param tree from its logical axis names.

    A dimension that its mesh axes do not divide (a tiny test vocab of 97 on a 2-way tensor axis) is
    replicated instead, with a log line, rather than failing deep inside `device_put`.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_abstract), rules or rules_for(mesh))
    values = nn.meta.unbox(boxed_abstract)

    def fit(spec, value):
        parts = list(spec) + [None] * (len(value.shape) - len(spec))
        for dim, axes in enumerate(parts):
            if axes is None:
                continue
            size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
            if value.shape[dim] % size:
                log.info("replicating dim %d of a %s param: %d is not divisible by %s=%d", dim, value.shape,
                         value.shape[dim], axes, size)
                parts[dim] = None
        return NamedSharding(mesh, PartitionSpec(*parts))

    return jax.tree.map(fit, specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicate(tree, mesh: Mesh):
    """The same tree of shardings, every leaf fully replicated on `mesh`."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)
