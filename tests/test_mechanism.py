"""What the synthetic study relies on: F and G start as the identity, one meaning of each fusion from training to
serving, no STC window mixing x and F(x), the KL's reductions against torch, its target diagnostics, the
exo-heavy init mix, the shared tower, and the linear probe on cases whose answer is known."""
import dataclasses
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import flax.linen as nn

from exo2ego_jax.data import synthetic
from exo2ego_jax.data.loader import shows_other_view
from exo2ego_jax.losses import KL_REDUCTIONS, LossConfig, feature_kl, kl_target_stats
from exo2ego_jax.models.exo2ego import Exo2Ego, guidance_forward
from exo2ego_jax.models.mapper import MapperConfig, build_mapper
from exo2ego_jax.models.stc import STCConfig, STCConnector
from exo2ego_jax.study import probes
from exo2ego_jax.train.stages import get_stage, stage_loss
from exo2ego_jax.configfile import load_config_file
from tests.helpers import ROOT, stage_config
from tests.test_stages import init_params, tiny_batch, tiny_config


@pytest.mark.parametrize("kind,norm", [("resnet", "instance"), ("resnet", "layer"), ("mlp", "layer")])
def test_residual_mapper_is_exactly_the_identity_at_init(kind, norm):
    cfg = MapperConfig(kind=kind, channels=8, width=4, num_blocks=2, residual=True, norm=norm)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 8)) * 3, jnp.float32)
    mapper = build_mapper(cfg, "f")
    y, variables = jax.jit(mapper.init_with_output)(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    if kind == "mlp":
        # and it can move away from the identity: the zero-initialised last layer gets a gradient
        params = nn.meta.unbox(variables["params"])
        grads = jax.jit(jax.grad(lambda p: jnp.sum(mapper.apply({"params": p}, x) ** 2)))(params)
        assert float(jnp.abs(grads["out_proj"]["kernel"]).max()) > 0


def test_residual_and_tanh_exclude_each_other():
    with pytest.raises(ValueError, match="residual"):
        MapperConfig(residual=True, output_tanh=True)
    with pytest.raises(ValueError, match="mapper.norm"):
        MapperConfig(norm="batch")


def test_layer_norm_mapper_sees_frame_level_content_instance_norm_does_not():
    """A per-frame shift of every token (content spread over the whole frame) reaches R(x) through the layer
    norm placement; the instance norm after the stem removes it exactly."""
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 8)).astype(np.float32)
    shifted = x + np.random.default_rng(2).normal(size=(1, 1, 1, 8)).astype(np.float32)
    out = {}
    for norm in ("instance", "layer"):
        m = build_mapper(MapperConfig(channels=8, width=4, num_blocks=1, norm=norm), "f")
        params = jax.jit(m.init)(jax.random.key(0), x)
        apply = jax.jit(m.apply)
        out[norm] = float(jnp.abs(apply(params, x) - apply(params, shifted)).max())
    assert out["instance"] < 1e-4 < out["layer"]


def residual_composite(seed=0):
    cfg = dataclasses.replace(tiny_config(), mapper=MapperConfig(channels=16, width=4, num_blocks=1, residual=True,
                                                                 norm="layer"))
    module = Exo2Ego(cfg)
    batch = tiny_batch(seed)
    init = jax.jit(lambda key: module.init(key, batch["input_ids"], batch["ego_pixels"], method="init_all"))
    return module, nn.meta.unbox(init(jax.random.key(seed))["params"]), batch


def test_stc_of_f_equals_stc_of_x_at_the_start_of_stage_2():
    module, params, batch = residual_composite()

    def both(m, pixels):
        x = m.encode(pixels, "ego")
        fx = m.map_f(x)
        return x, fx, m.connect(x, fusion="none"), m.connect(fx, fusion="none")

    x, fx, stc_x, stc_fx = jax.jit(lambda p, px: module.apply({"params": p}, px, method=both))(
        params, batch["ego_pixels"])
    np.testing.assert_array_equal(np.asarray(fx), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(stc_fx), np.asarray(stc_x))


@pytest.mark.parametrize("fusion", ["none", "mapped", "tokens", "frames"])
def test_each_fusion_means_the_same_in_stage_2_training_and_in_serving(fusion):
    """The logits stage 2 trains on are the logits the exported model serves with that fusion."""
    module, params = init_params(tiny_config())
    b = tiny_batch()
    trained = jax.jit(lambda p: module.apply(
        {"params": p}, b["ego_pixels"], b["exo_pixels"], b["input_ids"], b["attention_mask"], b["labels"],
        fusion=fusion, cycle="both", detach_cycle_targets=False, deterministic=True,
        method=guidance_forward)["logits"])(params)
    serve = jax.jit(lambda p: module.apply({"params": p}, b["input_ids"], b["ego_pixels"],
                                           attention_mask=b["attention_mask"], fusion=fusion))
    served = serve(params)
    np.testing.assert_allclose(np.asarray(trained), np.asarray(served), atol=1e-6)
    # "none" is x alone: F's params are not on the path
    noisy = dict(params, mapper_f=jax.tree.map(lambda p: p + 1.0, params["mapper_f"]))
    moved = serve(noisy)
    assert np.array_equal(np.asarray(moved), np.asarray(served)) == (fusion == "none")


def test_frames_fusion_never_mixes_x_and_fx_in_one_stc_window():
    cfg = STCConfig(encoder_hidden_size=8, hidden_size=12, depth=1)
    stc = STCConnector(cfg)
    rng = np.random.default_rng(0)
    t, grid = 3, 4  # an odd frame count: with padding 1 a window would otherwise span x's last and F(x)'s first
    x = jnp.asarray(rng.normal(size=(1, t, grid * grid, 8)), jnp.float32)
    fx = jnp.asarray(rng.normal(size=(1, t, grid * grid, 8)), jnp.float32)
    params = jax.jit(stc.init)(jax.random.key(0), x)
    per_clip = cfg.num_tokens(t, grid)
    frames = lambda a, b: stc.apply(params, jnp.concatenate([a, b], axis=1), segments=2)
    run = jax.jit(frames)
    out = np.asarray(run(x, fx))
    # x's tokens do not move when F(x) changes, nor F(x)'s when x changes (bit for bit)
    np.testing.assert_array_equal(np.asarray(run(x, fx + 1.0))[:, :per_clip], out[:, :per_clip])
    np.testing.assert_array_equal(np.asarray(run(x - 1.0, fx))[:, per_clip:], out[:, per_clip:])
    # and each half is the connector's reading of that clip alone (the tokens of fusion "tokens")
    alone = jax.jit(lambda a: stc.apply(params, a))
    np.testing.assert_allclose(out[:, :per_clip], alone(x), atol=1e-5)
    np.testing.assert_allclose(out[:, per_clip:], alone(fx), atol=1e-5)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("direction", ["exo_to_mapped", "mapped_to_exo"])
def test_kl_reductions_match_torch_kl_div(reduction, direction):
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    y = rng.normal(size=(3, 2, 5, 7)).astype(np.float32) * 2   # [B, T, P, C]
    fx = rng.normal(size=(3, 2, 5, 7)).astype(np.float32) * 2
    tau = 1.5
    target, inp = (y, fx) if direction == "exo_to_mapped" else (fx, y)
    want = F.kl_div(F.log_softmax(torch.from_numpy(inp) / tau, -1), F.log_softmax(torch.from_numpy(target) / tau, -1),
                    reduction=reduction, log_target=True).item() * tau ** 2
    got = float(feature_kl(jnp.asarray(y), jnp.asarray(fx), temperature=tau, direction=direction, reduction=reduction))
    assert got == pytest.approx(want, rel=1e-5)


def test_token_mean_is_torch_batchmean_over_the_tokens():
    rng = np.random.default_rng(1)
    y, fx = (jnp.asarray(rng.normal(size=(2, 3, 4, 6)), jnp.float32) for _ in range(2))
    assert set(KL_REDUCTIONS) == {"token_mean", "batchmean", "sum", "mean"}
    assert LossConfig().kl_reduction == "token_mean"
    np.testing.assert_allclose(float(feature_kl(y, fx, reduction="token_mean")) * 3 * 4,
                               float(feature_kl(y, fx, reduction="batchmean")), rtol=1e-5)


def test_kl_target_diagnostics():
    c = 8
    flat = kl_target_stats(jnp.zeros((2, 3, 4, c)))
    assert float(flat["kl_target_entropy"]) == pytest.approx(np.log(c), rel=1e-6)
    assert float(flat["kl_target_top_mass"]) == pytest.approx(1 / c, rel=1e-6)
    spiky = jnp.zeros((2, 3, 4, c)).at[..., 0].set(60.0)  # a few huge channels, as CLIP-L's
    peaked = kl_target_stats(spiky)
    assert float(peaked["kl_target_top_mass"]) > 0.999 and float(peaked["kl_target_entropy"]) < 1e-3
    softer = kl_target_stats(spiky, temperature=30.0)  # a temperature flattens it
    assert float(softer["kl_target_top_mass"]) < float(peaked["kl_target_top_mass"])


def test_stage2_metrics_carry_the_kl_target_diagnostics_with_the_kl_off_too():
    module, params = init_params(tiny_config())
    loss = LossConfig(use_kl=False)
    batch = tiny_batch()
    _, metrics = jax.jit(lambda p: stage_loss(module, p, batch, get_stage("stage2", loss=loss), loss))(params)
    y = jax.jit(lambda p: module.apply({"params": p}, batch["exo_pixels"], "exo", method="encode"))(params)
    want = kl_target_stats(y)
    for key in ("kl_target_entropy", "kl_target_top_mass"):
        assert float(metrics[key]) == pytest.approx(float(want[key]), rel=1e-5)


def test_exo_fraction_shows_that_share_of_records_through_their_exo_clip():
    uids = [f"take{i:04d}_{j}" for i in range(200) for j in range(6)]
    share = np.mean([shows_other_view(u, 0.96) for u in uids])
    assert 0.94 < share < 0.98
    assert not any(shows_other_view(u, 0.0) for u in uids) and all(shows_other_view(u, 1.0) for u in uids)
    assert [shows_other_view(u, 0.5) for u in uids[:50]] == [shows_other_view(u, 0.5) for u in uids[:50]]


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_random_init_starts_both_towers_from_the_same_weights(shared):
    from exo2ego_jax.models.params import flatten
    from exo2ego_jax.sharding import create_mesh
    from exo2ego_jax.train import config as config_lib, state as state_lib
    from exo2ego_jax.train.optim import make_optimizer
    c = stage_config("stage0", **{"init.shared_tower": shared, "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
    run = config_lib.resolve(c)
    module = Exo2Ego(run.model)
    mesh = create_mesh((1, 1, 1), jax.devices()[:1])
    layout = state_lib.build_layout(module, mesh, run.stage, make_optimizer(c.optim, 10)[0])
    _, frozen = state_lib.init_params(run, module, mesh, layout, seed=c.seed, frozen_dtype="float32")
    ego, exo = flatten(frozen["ego_encoder"]), flatten(frozen["exo_encoder"])
    same = all(np.array_equal(np.asarray(ego[k]), np.asarray(exo[k])) for k in ego)
    assert same == shared


def test_demo_presets_build_the_premise():
    cfg = {s: load_config_file(os.path.join(ROOT, "configs", f"{s}.py"), "demo") for s in
           ("stage0", "stage1", "stage2", "stage3")}
    assert cfg["stage0"].data.exo_fraction > 0.9  # the init reads mostly exocentric clips
    assert all(c.init.shared_tower for c in cfg.values())
    lr = {s: c.optim.learning_rate for s, c in cfg.items()}
    assert lr["stage1"] == lr["stage2"] > lr["stage3"]  # the paper's pattern
    for preset in ("demo", "7b"):
        mapper = load_config_file(os.path.join(ROOT, "configs", "stage2.py"), preset).model.mapper
        assert mapper.residual
    big = load_config_file(os.path.join(ROOT, "configs", "stage2.py"), "7b").model.mapper
    assert big.kind == "resnet" and big.num_blocks == 9  # the paper's generator at 7b


def test_linear_probe_on_hand_made_cases():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    centres = rng.normal(size=(4, 6)) * 5
    separable = centres[labels] + rng.normal(size=(200, 6)) * 0.1
    assert probes.linear_probe(separable, labels, separable, labels).mean() == 1.0
    noise_train, noise_test = rng.normal(size=(200, 6)), rng.normal(size=(400, 6))
    test_labels = np.repeat(np.arange(4), 100)
    chance = probes.summarize(probes.linear_probe(noise_train, labels, noise_test, test_labels))
    assert chance["n"] == 400 and chance["ci95"][0] < 25.0 < chance["ci95"][1]
    # 30 of 40 right: Wilson's interval for one run, the bootstrap over seeds and items for several
    one = probes.summarize(np.array([1] * 30 + [0] * 10))
    assert one["accuracy"] == 75.0 and one["ci95"] == pytest.approx([59.8, 85.8], abs=0.1)
    two = probes.summarize(np.array([[1] * 30 + [0] * 10, [1] * 20 + [0] * 20]))
    assert two["accuracy"] == 62.5 and two["per_seed"] == [75.0, 50.0] and two["ci95"][0] < 62.5 < two["ci95"][1]


def test_synthetic_answers_name_their_action():
    for i, action in enumerate(synthetic.ACTIONS):
        assert synthetic.action_of(synthetic.canonical(action, "red", "cube")) == i
    with pytest.raises(ValueError):
        synthetic.action_of("C juggles the red cube")
