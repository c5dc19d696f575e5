"""LoRA: identity at init, merge == unmerged, adapter math == peft, init == peft's distribution, splits."""
import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import exo2ego_jax
from exo2ego_jax.convert import convert_mistral
from exo2ego_jax.models.lora import LoRAConfig, LoRADense, is_lora_path, merge_lora
from exo2ego_jax.models.params import combine_params, flatten, path_matcher, split_params, unflatten

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ckpt(hf_mistral, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mistral_lora"))
    convert_mistral(hf_mistral[1], path, dtype="float32", scan_layers=False, show_progress=False)
    return path


def ids_and_mask():
    ids = np.random.default_rng(0).integers(3, 97, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def randomize_b(params, seed=1, std=0.05):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.key(seed)
    out = []
    for path, leaf in leaves:
        key, sub = jax.random.split(key)
        is_b = getattr(path[-1], "key", None) == "lora_b"
        out.append(jax.random.normal(sub, leaf.shape) * std if is_b else leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def test_fresh_adapters_equal_base(ckpt):
    ids, mask = ids_and_mask()
    base_module, base_params = exo2ego_jax.load_pretrained(ckpt)
    module, params = exo2ego_jax.load_pretrained(ckpt, lora=LoRAConfig(rank=4, alpha=8, dropout=0.0))
    layer = params["decoder"]["layers_0"]
    assert layer["self_attn"]["q_proj"]["lora_a"].shape == (64, 4)
    assert float(jnp.abs(layer["mlp"]["down_proj"]["lora_b"]).max()) == 0.0
    assert float(jnp.abs(layer["mlp"]["down_proj"]["lora_a"]).max()) > 0.0
    np.testing.assert_array_equal(module.apply({"params": params}, ids, attention_mask=mask),
                                  base_module.apply({"params": base_params}, ids, attention_mask=mask))


@pytest.mark.parametrize("scan", [True, False])
def test_merged_equals_unmerged(ckpt, scan):
    ids, mask = ids_and_mask()
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q", "v", "down"))
    module, params = exo2ego_jax.load_pretrained(ckpt, lora=lora, scan_layers=scan)
    params = randomize_b(params)
    unmerged = module.apply({"params": params}, ids, attention_mask=mask)
    base_module = type(module)(dataclasses.replace(module.config, lora=None))
    merged = base_module.apply({"params": merge_lora(params, lora.scale)}, ids, attention_mask=mask)
    base_params = unflatten({k: v for k, v in flatten(params).items() if not is_lora_path(k)})
    base = base_module.apply({"params": base_params}, ids, attention_mask=mask)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    assert float(jnp.abs(merged - base).max()) > 1e-3  # the adapters really changed the model


def test_adapter_math_equals_peft(hf_mistral, ckpt):
    import peft
    import torch
    model, _ = hf_mistral
    rank, alpha = 4, 8
    peft_model = peft.get_peft_model(
        _clone(model), peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS)).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    module, params = exo2ego_jax.load_pretrained(ckpt, lora=LoRAConfig(rank=rank, alpha=alpha, dropout=0.0))
    params = jax.tree.map(np.asarray, params)
    state = dict(peft_model.named_parameters())
    for i in range(3):
        layer = params["decoder"][f"layers_{i}"]
        for group, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])):
            for proj in names:
                stem = f"base_model.model.model.layers.{i}.{group}.{proj}"
                layer[group][proj]["lora_a"] = state[f"{stem}.lora_A.default.weight"].detach().numpy().T
                layer[group][proj]["lora_b"] = state[f"{stem}.lora_B.default.weight"].detach().numpy().T
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = np.asarray(module.apply({"params": params}, ids, attention_mask=mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def _clone(model):
    import copy
    return copy.deepcopy(model)


def test_lora_a_init_matches_peft_distribution():
    import peft
    import torch
    fan_in, rank = 256, 64
    lin = torch.nn.Sequential()
    lin.add_module("q_proj", torch.nn.Linear(fan_in, 32, bias=False))
    peft_lin = peft.get_peft_model(lin, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj"]))
    ref_a = dict(peft_lin.named_parameters())["base_model.model.q_proj.lora_A.default.weight"].detach().numpy()
    layer = LoRADense(32, ("embed", "heads"), lora=LoRAConfig(rank=rank, alpha=2 * rank))
    params = nn_unbox(layer.init(jax.random.key(0), jnp.zeros((1, fan_in))))["params"]
    ours = np.asarray(params["lora_a"])
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(ours).max() <= bound and np.abs(ref_a).max() <= bound
    # both uniform on [-bound, bound]: std = bound / sqrt(3)
    np.testing.assert_allclose([ours.std(), ref_a.std()], [bound / np.sqrt(3)] * 2, rtol=0.05)
    assert float(np.abs(np.asarray(params["lora_b"])).max()) == 0.0


def test_dropout_only_in_training():
    layer = LoRADense(8, ("embed", "heads"), lora=LoRAConfig(rank=2, alpha=4, dropout=0.5), deterministic=False)
    x = jnp.ones((4, 16))
    params = nn_unbox(layer.init(jax.random.key(0), x))["params"]
    params["lora_b"] = jnp.ones_like(params["lora_b"])
    y1 = layer.apply({"params": params}, x, rngs={"dropout": jax.random.key(1)})
    y2 = layer.apply({"params": params}, x, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(y1 - y2).max()) > 0
    eval_layer = layer.clone(deterministic=True)
    np.testing.assert_array_equal(eval_layer.apply({"params": params}, x), eval_layer.apply({"params": params}, x))


def test_split_and_combine_params(ckpt):
    _, params = exo2ego_jax.load_pretrained(ckpt, lora=LoRAConfig(rank=2, alpha=4, dropout=0.0))
    trainable, frozen = split_params(params, path_matcher([r".*/lora_[ab]"]))
    flat_t = jax.tree_util.tree_flatten_with_path(trainable)[0]
    assert len(flat_t) == 3 * 7 * 2
    assert all(p[-1].key in ("lora_a", "lora_b") for p, _ in flat_t)
    restored = combine_params(trainable, frozen)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="appears in more than one tree"):
        combine_params(trainable, trainable)


def test_bad_lora_config_is_rejected():
    with pytest.raises(ValueError, match="lora.targets has unknown modules"):
        LoRAConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="lora.rank"):
        LoRAConfig(rank=0)


def nn_unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)
