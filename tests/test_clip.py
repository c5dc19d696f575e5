"""CLIP vision encoder parity with HF `CLIPVisionModel` through the real conversion + loading path."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import exo2ego_jax
from exo2ego_jax.convert import convert_clip


def hf_features(model, pixels_nhwc, select_layer):
    import torch
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
    return out.hidden_states[select_layer][:, 1:].numpy()


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("select_layer", [-2, -1, 2])
def test_selected_layer_features_match_hf(hf_clip, tmp_path, scan, select_layer):
    model, hf_dir = hf_clip
    convert_clip(hf_dir, str(tmp_path / "ckpt"), dtype="float32", scan_layers=scan, select_layer=select_layer,
                 show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"))
    pixels = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, pixels))
    ref = hf_features(model, pixels, select_layer)
    assert ours.shape == ref.shape == (3, 16, 32)
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-5 * np.abs(ref).max())


def test_layers_after_selected_are_not_built(hf_clip, tmp_path):
    _, hf_dir = hf_clip
    summary = convert_clip(hf_dir, str(tmp_path / "ckpt"), dtype="float32", scan_layers=False, show_progress=False)
    _, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"))
    assert sorted(k for k in params if k.startswith("layers_")) == ["layers_0", "layers_1", "layers_2"]
    assert "post_layernorm" not in params
    # layer 3 (16 tensors) and post_layernorm (2) are known-unused and skipped, not silently dropped
    assert summary["skipped_tensors"] == 18


def test_remat_and_scan_do_not_change_features(hf_clip, tmp_path):
    _, hf_dir = hf_clip
    convert_clip(hf_dir, str(tmp_path / "ckpt"), dtype="float32", show_progress=False)
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    base_module, base_params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"))
    base = base_module.apply({"params": base_params}, pixels)
    for overrides in (dict(remat_policy="full"), dict(scan_layers=False, remat_policy="dots")):
        module, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"), **overrides)
        loss = lambda p, module=module: jnp.sum(module.apply({"params": p}, pixels) ** 2)
        np.testing.assert_allclose(module.apply({"params": params}, pixels), base, atol=1e-6)
        grads = jax.grad(loss)(params)
        assert float(jnp.abs(jax.tree.leaves(grads)[0]).sum()) > 0


def test_wrong_pixel_shape_is_a_clear_error(hf_clip, tmp_path):
    _, hf_dir = hf_clip
    convert_clip(hf_dir, str(tmp_path / "ckpt"), dtype="float32", show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"CLIP expects pixels \[N, 16, 16, 3\].*got \(2, 3, 16, 16\)"):
        module.apply({"params": params}, jnp.zeros((2, 3, 16, 16)))


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_odd_length_padding_is_exact(monkeypatch, causal):
    """The cuDNN route pads an odd length by one masked position; run with XLA standing in for the cuDNN
    kernel (same arguments: causal, key lengths), it equals plain attention on the odd length."""
    from exo2ego_jax.models import layers
    real = jax.nn.dot_product_attention
    seen = []

    def as_xla(*args, implementation=None, **kwargs):
        seen.append(args[0].shape[1])
        return real(*args, implementation="xla", **kwargs)

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 577, 4, 8)).astype(np.float32) for _ in range(3))
    want = real(q, k, v, is_causal=causal, implementation="xla")
    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    got = layers.dot_product_attention(q, k, v, impl="cudnn", is_causal=causal)
    assert seen == [578]  # the kernel saw an even length
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
