"""Stage losses: gradients exactly on each stage's trainable set; loss terms and ablation switches."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

from exo2ego_jax.models import registry
from exo2ego_jax.losses import LossConfig, feature_kl, vtg_loss
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.exo2ego import Exo2Ego, Exo2EgoConfig
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.params import path_matcher
from exo2ego_jax.models.mapper import MapperConfig
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.models.stc import STCConfig
from exo2ego_jax.train.stages import get_stage, stage_loss


def tiny_config(lora=None, mapper_kind="resnet"):
    return Exo2EgoConfig(
        # an 8x8 patch grid: the resnet mapper's bottleneck is then 2x2 (a 1x1 map would instance-norm to 0)
        clip=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, patch_size=2,
                              image_size=16),
        llm=MistralConfig(vocab_size=40, hidden_size=24, intermediate_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=6, lora=lora),
        stc=STCConfig(encoder_hidden_size=16, hidden_size=24, depth=1),
        mapper=MapperConfig(kind=mapper_kind, channels=16, width=4, num_blocks=1), num_frames=2)


def tiny_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 40, size=(2, 7))
    ids[:, 1] = -201
    mask = np.ones_like(ids, bool)
    mask[1, 5:] = False
    labels = np.where(mask, ids, -100)
    labels[:, :3] = -100
    return dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
                ego_pixels=jnp.asarray(rng.normal(size=(2, 2, 16, 16, 3)), jnp.float32),
                exo_pixels=jnp.asarray(rng.normal(size=(2, 2, 16, 16, 3)), jnp.float32))


def init_params(cfg, seed=0):
    """Random params of the right shapes, every one off its init (LoRA B = 0 would zero A's gradient).
    numpy fills them directly: compiling `init` for every random initialiser costs ~10 s on CPU."""
    module = Exo2Ego(cfg)
    shapes = registry.flat_shapes(registry.abstract_params("exo2ego", module))
    rng = np.random.default_rng(seed)
    flat = {k: jnp.asarray((1.0 if k.endswith("scale") else 0.0) + 0.05 * rng.standard_normal(v.shape), v.dtype)
            for k, v in shapes.items()}
    return module, traverse_util.unflatten_dict(flat, sep="/")


# Conv biases directly followed by instance norm have exactly-zero true gradients (the norm removes any
# constant shift); numerically they come out at rounding level, so they are not required to be non-zero.
BIAS_BEFORE_NORM = path_matcher([r"mapper_[fg]/(stem|down_\d|up_\d)/(conv/)?bias",
                                 r"mapper_[fg]/block_\d/conv_\d/conv/bias"])


@pytest.mark.parametrize("stage", ["init", "stage1", "stage2", "stage3"])
def test_gradients_exactly_on_trainable_set(stage):
    lora = LoRAConfig(rank=2, alpha=4, dropout=0.0) if stage == "stage3" else None
    module, params = init_params(tiny_config(lora))
    spec = get_stage(stage)
    grads = jax.jit(jax.grad(lambda p: stage_loss(module, p, tiny_batch(), spec, LossConfig())[0]))(params)
    is_trainable = path_matcher(spec.trainable)
    flat = traverse_util.flatten_dict(grads, sep="/")
    trainable = [k for k in flat if is_trainable(k)]
    assert trainable, stage
    for path, g in flat.items():
        norm = float(jnp.abs(g).max())
        if is_trainable(path):
            if not BIAS_BEFORE_NORM(path):
                assert norm > 0, f"{stage}: trainable {path} got no gradient"
        else:
            assert norm == 0, f"{stage}: frozen {path} got a gradient"


def test_stage2_terms_and_ablations():
    module, params = init_params(tiny_config())
    batch = tiny_batch()
    _, full = jax.jit(lambda p: stage_loss(module, p, batch, get_stage("stage2"), LossConfig()))(params)
    assert set(full) >= {"vtg", "cycle_forward", "cycle_backward", "kl", "loss", "kl_target_entropy",
                         "kl_target_top_mass"}
    assert all(float(full[k]) > 0 for k in ("vtg", "cycle_forward", "cycle_backward", "kl"))
    total = full["vtg"] + full["cycle_forward"] + full["cycle_backward"] + full["kl"]
    np.testing.assert_allclose(full["loss"], total, rtol=1e-6)

    cfg = LossConfig(cycle="forward", use_kl=False, vtg_weight=0.5, cycle_weight=2.0)
    _, fwd = jax.jit(lambda p: stage_loss(module, p, batch, get_stage("stage2", loss=cfg), cfg))(params)
    assert "cycle_backward" not in fwd and "kl" not in fwd
    np.testing.assert_allclose(fwd["loss"], 0.5 * full["vtg"] + 2.0 * full["cycle_forward"], rtol=1e-6)

    no_g = LossConfig(cycle="none")
    spec = get_stage("stage2", loss=no_g)
    assert not any(p.startswith("mapper_g") for p in spec.trainable)
    grads = jax.jit(jax.grad(lambda p: stage_loss(module, p, batch, spec, no_g)[0]))(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["mapper_g"]))


def test_mlp_mapper_ablation_trains():
    module, params = init_params(tiny_config(mapper_kind="mlp"))
    grads = jax.jit(jax.grad(lambda p: stage_loss(module, p, tiny_batch(), get_stage("stage2"), LossConfig())[0]))(params)
    assert float(jnp.abs(grads["mapper_f"]["in_proj"]["kernel"]).max()) > 0


def test_vtg_hand_computed():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = jnp.array([[-100, 1, -100]])
    loss, count = vtg_loss(logits, labels)
    assert int(count) == 1 and abs(float(loss) + np.log(0.25)) < 1e-6


def test_kl_hand_computed_and_direction():
    y = jnp.array([[[0.0, np.log(3.0)]]])      # softmax -> [1/4, 3/4]
    fx = jnp.array([[[0.0, 0.0]]])             # softmax -> [1/2, 1/2]
    want = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
    assert abs(float(feature_kl(y, fx)) - want) < 1e-6
    rev = 0.5 * np.log(2.0) + 0.5 * np.log(2 / 3)
    assert abs(float(feature_kl(y, fx, direction="mapped_to_exo")) - rev) < 1e-6
    t = 2.0
    p, q = jax.nn.softmax(y / t), jax.nn.softmax(fx / t)
    want_t = float(jnp.sum(p * (jnp.log(p) - jnp.log(q)))) * t * t
    assert abs(float(feature_kl(y, fx, temperature=t)) - want_t) < 1e-6


def test_bad_stage_and_loss_config():
    with pytest.raises(ValueError, match="config field 'stage'"):
        get_stage("stage4")
    with pytest.raises(ValueError, match="loss.kl_direction"):
        LossConfig(kl_direction="sideways")
