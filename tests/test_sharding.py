"""Logical axis names -> ('data', 'fsdp', 'tensor') mesh: sharded loading gives the unsharded result."""
import numpy as np
import pytest
import jax
import flax.linen as nn
import jax.numpy as jnp

import exo2ego_jax
from exo2ego_jax.convert import convert_mistral
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.sharding import LOGICAL_AXIS_RULES, create_mesh, logical_rules, mesh_shape


def test_mesh_shape_fill_and_errors():
    assert mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"uses 12 devices but 8 are available"):
        mesh_shape((3, 4, 1), 8)
    with pytest.raises(ValueError, match="cannot fill 8 devices"):
        mesh_shape((-1, 3, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_shape((-1, -1, 1), 8)


def test_every_param_has_logical_names(hf_mistral, tmp_path):
    from exo2ego_jax.models import registry
    from exo2ego_jax.models.clip import CLIPVisionConfig
    from exo2ego_jax.models.mistral import MistralConfig
    for kind, cfg in (("clip", CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                                 patch_size=4, image_size=8, scan_layers=True)),
                      ("mistral", MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                                                num_heads=4, num_kv_heads=2, head_dim=8,
                                                lora=LoRAConfig(rank=2, alpha=4)))):
        boxed = registry.abstract_params(kind, registry.build_module(kind, cfg))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), kind
        names = {n for x in leaves for n in x.names if n is not None}
        known = {rule for rule, _ in LOGICAL_AXIS_RULES}
        assert names <= known, names - known


def test_without_tensor_axis_params_without_embed_shard_over_fsdp():
    """Conv kernels, LoRA B and the like have no `embed` dimension: with tensor = 1 they shard over fsdp,
    with a tensor axis over it (Megatron style); `embed` always takes fsdp first."""
    fsdp_only, with_tp = logical_rules(tensor_parallel=False), logical_rules(tensor_parallel=True)
    to_mesh = lambda names, rules: tuple(nn.logical_to_mesh_axes(names, rules))
    assert to_mesh((None, None, None, "channels"), fsdp_only) == (None, None, None, "fsdp")
    assert to_mesh(("lora_rank", "heads"), fsdp_only) == (None, "fsdp")
    assert to_mesh(("embed", "mlp"), fsdp_only) == ("fsdp", None)
    assert to_mesh(("embed", "mlp"), with_tp) == ("fsdp", "tensor")
    assert to_mesh((None, None, None, "channels"), with_tp) == (None, None, None, "tensor")


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_load_gives_unsharded_logits(hf_mistral, tmp_path, shape):
    convert_mistral(hf_mistral[1], str(tmp_path / "ckpt"), dtype="float32", show_progress=False)
    ids = np.random.default_rng(0).integers(3, 97, size=(8, 6))
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"))
    ref = np.asarray(module.apply({"params": params}, ids))

    mesh = create_mesh(shape)
    module, sharded = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"), mesh=mesh)
    gate = sharded["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]  # ('layers', 'embed', 'mlp')
    tensor = "tensor" if shape[2] > 1 else None  # with tensor = 1, fsdp already holds `embed`
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", tensor)
    n_layers, embed, mlp = gate.shape
    assert gate.addressable_shards[0].data.shape == (n_layers, embed // shape[1], mlp // shape[2])
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, i: module.apply({"params": p}, i))(sharded, jax.device_put(ids, data))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_stc_kernel_gradients_under_sharding(shape):
    """Regression: XLA's SPMD partitioner gave wrong grouped-conv kernel gradients with the batch over
    (data, fsdp) and channels over tensor; the STC's depthwise conv avoids grouped convs."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from exo2ego_jax.models.stc import STCConfig, STCConnector
    from exo2ego_jax.sharding import logical_shardings
    cfg = STCConfig(encoder_hidden_size=8, hidden_size=16, depth=1)
    module = STCConnector(cfg)
    x = np.random.default_rng(0).normal(size=(8, 2, 16, 8)).astype(np.float32)
    boxed = module.init(jax.random.key(0), x)["params"]
    params = nn.meta.unbox(boxed)
    loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) ** 2)
    ref = jax.jit(jax.grad(loss))(params, x)
    mesh = create_mesh(shape)
    ps = jax.device_put(params, logical_shardings(boxed, mesh))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss))(ps, xs)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale
