"""STC connector vs timm RegStage + torch Conv3d; mappers vs a torch.nn CycleGAN ResNet generator."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

from exo2ego_jax.convert.stc import params_from_state_dict, stc_rules
from tests.torch_reference import torch_stc
from exo2ego_jax.models.mapper import MapperConfig, build_mapper
from exo2ego_jax.models.stc import STCConfig, STCConnector


def perturbed_state(module, seed):
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("variant,padding,frames", [("stc", 1, 4), ("stc_v35", 0, 4), ("stc", 1, 3)])
def test_stc_matches_timm_reference(variant, padding, frames):
    import torch
    enc, hid, depth, grid = 12, 16, 2, 6
    ref = torch_stc(enc, hid, depth, padding).eval()
    state = perturbed_state(ref, 0)
    cfg = STCConfig(encoder_hidden_size=enc, hidden_size=hid, depth=depth, variant=variant)
    params = params_from_state_dict(state, stc_rules(cfg))
    x = np.random.default_rng(0).normal(size=(2, frames, grid * grid, enc)).astype(np.float32)
    ours = np.asarray(STCConnector(cfg).apply({"params": params}, x))
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert ours.shape == want.shape == (2, cfg.num_tokens(frames, grid), hid)
    assert np.abs(ours - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_stc_token_counts_at_full_size():
    cfg = STCConfig()
    assert cfg.num_tokens(16, 24) == 1521 and cfg.num_tokens(32, 24) == 2873
    assert STCConfig(variant="stc_v35").num_tokens(16, 24) == 1152
    out = jax.eval_shape(lambda: STCConnector(cfg).init_with_output(jax.random.key(0), jnp.zeros((1, 16, 576, 1024)))[0])
    assert out.shape == (1, 1521, 4096)


def test_stc_parameter_count():
    from flax import linen as nn
    boxed = jax.eval_shape(lambda: STCConnector(STCConfig()).init(jax.random.key(0), jnp.zeros((1, 2, 576, 1024))))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
    assert abs(n - 489.2e6) < 0.1e6


def torch_generator(ch, ngf, blocks):
    """CycleGAN resnet generator from torch.nn layers (instance norm, no tanh), as in torch_anchor.py."""
    import torch.nn as tnn
    norm = lambda c: tnn.InstanceNorm2d(c)
    layers = [tnn.ReflectionPad2d(3), tnn.Conv2d(ch, ngf, 7), norm(ngf), tnn.ReLU()]
    for i in range(2):
        layers += [tnn.Conv2d(ngf * 2 ** i, ngf * 2 ** (i + 1), 3, 2, 1), norm(ngf * 2 ** (i + 1)), tnn.ReLU()]

    class Block(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.f = tnn.Sequential(tnn.ReflectionPad2d(1), tnn.Conv2d(c, c, 3), norm(c), tnn.ReLU(),
                                    tnn.ReflectionPad2d(1), tnn.Conv2d(c, c, 3), norm(c))

        def forward(self, x):
            return x + self.f(x)

    layers += [Block(ngf * 4) for _ in range(blocks)]
    for i in range(2, 0, -1):
        layers += [tnn.ConvTranspose2d(ngf * 2 ** i, ngf * 2 ** (i - 1), 3, 2, 1, output_padding=1),
                   norm(ngf * 2 ** (i - 1)), tnn.ReLU()]
    layers += [tnn.ReflectionPad2d(3), tnn.Conv2d(ngf, ch, 7)]
    return tnn.Sequential(*layers)


def generator_params(state, blocks):
    """torch Sequential indices -> our names (the mapping a user would need to import CycleGAN weights)."""
    conv = lambda w: w.transpose(2, 3, 1, 0)
    # ConvTranspose2d weight [in, out, kh, kw] -> flax transpose_kernel=True kernel [kh, kw, out, in]
    tconv = lambda w: w.transpose(2, 3, 1, 0)
    flat = {"stem/conv/kernel": conv(state["1.weight"]), "stem/conv/bias": state["1.bias"]}
    for i, idx in enumerate((4, 7)):
        flat[f"down_{i}/conv/kernel"] = conv(state[f"{idx}.weight"])
        flat[f"down_{i}/conv/bias"] = state[f"{idx}.bias"]
    for b in range(blocks):
        idx = 10 + b
        for j, sub in enumerate((1, 5)):
            flat[f"block_{b}/conv_{j}/conv/kernel"] = conv(state[f"{idx}.f.{sub}.weight"])
            flat[f"block_{b}/conv_{j}/conv/bias"] = state[f"{idx}.f.{sub}.bias"]
    for i, idx in enumerate((10 + blocks, 13 + blocks)):
        flat[f"up_{i}/kernel"] = tconv(state[f"{idx}.weight"])
        flat[f"up_{i}/bias"] = state[f"{idx}.bias"]
    flat["head/conv/kernel"] = conv(state[f"{17 + blocks}.weight"])
    flat["head/conv/bias"] = state[f"{17 + blocks}.bias"]
    assert len(flat) == len(state)
    return traverse_util.unflatten_dict(flat, sep="/")


def test_resnet_mapper_matches_torch_generator():
    import torch
    ch, ngf, blocks, grid = 12, 4, 3, 8
    ref = torch_generator(ch, ngf, blocks).eval()
    state = perturbed_state(ref, 1)
    params = generator_params(state, blocks)
    cfg = MapperConfig(channels=ch, width=ngf, num_blocks=blocks)
    x = np.random.default_rng(1).normal(size=(3, grid, grid, ch)).astype(np.float32) * 2
    ours = np.asarray(build_mapper(cfg, "f").apply({"params": params}, x))
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_mapper_init_shapes_and_errors():
    cfg = MapperConfig(channels=8, width=4, num_blocks=2)
    m = build_mapper(cfg, "f")
    y, params = m.init_with_output(jax.random.key(0), jnp.ones((2, 8, 8, 8)))
    assert y.shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        m.init(jax.random.key(0), jnp.ones((1, 13, 13, 8)))
    mlp = build_mapper(MapperConfig(kind="mlp", channels=8, width=16, num_blocks=2), "f")
    assert mlp.init_with_output(jax.random.key(0), jnp.ones((2, 13, 13, 8)))[0].shape == (2, 13, 13, 8)
    with pytest.raises(ValueError, match="mapper.kind"):
        MapperConfig(kind="unet")
