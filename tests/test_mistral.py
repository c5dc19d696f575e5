"""Mistral decoder parity with HF `MistralForCausalLM`, KV-cache decoding and greedy generation."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import exo2ego_jax
from exo2ego_jax.convert import convert_mistral
from exo2ego_jax.models.mistral import init_cache


def hf_logits(model, ids, mask):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def right_padded_batch(vocab, lengths, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(len(lengths), seq_len)).astype(np.int64)
    mask = (np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask, ids, 0), mask


@pytest.fixture(scope="module")
def converted(hf_mistral, tmp_path_factory):
    out = {}
    for scan in (True, False):
        path = str(tmp_path_factory.mktemp(f"mistral_scan{scan}"))
        convert_mistral(hf_mistral[1], path, dtype="float32", scan_layers=scan, show_progress=False)
        out[scan] = path
    return out


@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_hf_on_right_padded_batch(hf_mistral, converted, scan):
    model, _ = hf_mistral
    module, params = exo2ego_jax.load_pretrained(converted[scan])
    ids, mask = right_padded_batch(97, [11, 7, 3], 11)
    ours = np.asarray(jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m))(params, ids, mask))
    ref = hf_logits(model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 11, 97)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-4  # padded rows too: same causal+padding semantics as HF


def test_sliding_window_matches_hf(hf_mistral_window, tmp_path):
    model, hf_dir = hf_mistral_window
    convert_mistral(hf_dir, str(tmp_path / "ckpt"), dtype="float32", show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"))
    assert module.config.sliding_window == 4
    ids, mask = right_padded_batch(97, [12, 9], 12, seed=1)
    ours = np.asarray(module.apply({"params": params}, ids, attention_mask=mask))
    ref = hf_logits(model, ids, mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    # and the window really matters: without it the logits differ
    from dataclasses import replace
    no_window = type(module)(replace(module.config, sliding_window=None))
    far = np.asarray(no_window.apply({"params": params}, ids, attention_mask=mask))
    assert np.abs(far - ref)[mask.astype(bool)].max() > 1e-3


def test_inputs_embeds_equals_input_ids(converted):
    module, params = exo2ego_jax.load_pretrained(converted[True])
    ids, mask = right_padded_batch(97, [6, 4], 6, seed=2)
    embeds = module.apply({"params": params}, ids, method="embed")
    a = module.apply({"params": params}, ids, attention_mask=mask)
    b = module.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask)
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        module.apply({"params": params}, ids, inputs_embeds=embeds)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_equals_full_forward(converted, scan):
    module, params = exo2ego_jax.load_pretrained(converted[scan])
    lengths, prompt_len, new = [5, 3], 5, 16
    ids, mask = right_padded_batch(97, lengths, prompt_len + new, seed=3)
    apply = jax.jit(lambda p, i, m, c: module.apply({"params": p}, i, attention_mask=m, cache=c))
    cache = init_cache(module.config, 2, prompt_len + new)
    prompt_mask = mask[:, :prompt_len] * (np.arange(prompt_len)[None] < np.asarray(lengths)[:, None])
    logits, cache = apply(params, ids[:, :prompt_len], prompt_mask, cache)
    # continue each sequence right after its own prompt: feed 16 tokens one at a time
    cont = np.random.default_rng(4).integers(3, 97, size=(2, new))
    step_logits = []
    for t in range(new):
        out, cache = apply(params, cont[:, t:t + 1], np.ones((2, 1), np.int64), cache)
        step_logits.append(np.asarray(out[:, 0]))
    # reference: full forward over each (prompt + continuation) without cache
    for b, n in enumerate(lengths):
        full_ids = np.concatenate([ids[b, :n], cont[b]])[None]
        full = np.asarray(module.apply({"params": params}, full_ids))
        np.testing.assert_allclose(np.asarray(logits)[b, n - 1], full[0, n - 1], atol=1e-4)
        np.testing.assert_allclose(np.stack(step_logits)[:, b], full[0, n:], atol=1e-4)


def test_greedy_continuation_equals_hf_generate(hf_mistral, converted):
    import torch
    model, _ = hf_mistral
    module, params = exo2ego_jax.load_pretrained(converted[True])
    prompt = np.random.default_rng(5).integers(3, 97, size=(1, 6))
    new = 12
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                             pad_token_id=0, eos_token_id=None)[0, 6:].numpy()
    apply = jax.jit(lambda p, i, c: module.apply({"params": p}, i, cache=c))
    cache = init_cache(module.config, 1, 6 + new)
    logits, cache = apply(params, prompt, cache)
    tokens = []
    nxt = np.asarray(logits[:, -1].argmax(-1))
    for _ in range(new):
        tokens.append(int(nxt[0]))
        logits, cache = apply(params, nxt[:, None], cache)
        nxt = np.asarray(logits[:, -1].argmax(-1))
    np.testing.assert_array_equal(np.asarray(tokens), ref)


def test_scan_and_remat_give_same_logits_and_grads(converted):
    ids, mask = right_padded_batch(97, [8, 5], 8, seed=6)
    results = []
    for scan, remat in ((True, "none"), (False, "full"), (True, "dots"), (False, "save_qkv_attn")):
        module, params = exo2ego_jax.load_pretrained(converted[True], scan_layers=scan, remat_policy=remat)
        loss = lambda p, module=module: jnp.mean(module.apply({"params": p}, ids, attention_mask=mask) ** 2)
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        g = grads["embed_tokens"]["embedding"]
        results.append((float(value), np.asarray(g)))
    for value, g in results[1:]:
        assert abs(value - results[0][0]) < 1e-6
        np.testing.assert_allclose(g, results[0][1], atol=1e-6)


def test_cudnn_path_masking_semantics_match_hf(hf_mistral_window, tmp_path, monkeypatch):
    """The cuDNN path expresses masking as causal + right-padding lengths + window. jax's XLA implementation
    takes the same arguments, so run those exact arguments on CPU and compare with HF."""
    import jax.nn
    from exo2ego_jax.models import layers
    real = jax.nn.dot_product_attention
    calls = []

    def on_cpu(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs.get("key_value_seq_lengths") is not None))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", on_cpu)
    model, hf_dir = hf_mistral_window
    convert_mistral(hf_dir, str(tmp_path / "ckpt"), dtype="float32", show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "ckpt"), attention_impl="cudnn")
    ids, mask = right_padded_batch(97, [12, 7], 12, seed=8)
    calls.clear()
    ours = np.asarray(module.apply({"params": params}, ids, attention_mask=mask))
    ref = hf_logits(model, ids, mask)
    assert calls and all(c == ("cudnn", True) for c in calls)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
