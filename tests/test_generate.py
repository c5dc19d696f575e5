"""Generation: equals step-by-step argmax of the full forward; batched == unbatched; EOS; seeded sampling."""
import pytest
import numpy as np
import jax
import jax.numpy as jnp

import exo2ego_jax
from exo2ego_jax.serve.generate import generate, sample_token


def argmax_reference(module, params, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = module.apply({"params": params}, np.asarray(ids)[None])
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt):]


@pytest.mark.slow
def test_greedy_equals_full_forward_argmax_and_batching(llm):
    module, params = llm
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (7, 3, 5)]
    ids = np.zeros((3, 7), np.int32)
    mask = np.zeros((3, 7), bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, True
    tokens, lengths = generate(module, params, ids, mask, max_new_tokens=10, eos_token_id=None)
    for i, p in enumerate(prompts):
        assert np.asarray(tokens[i]).tolist() == argmax_reference(module, params, p, 10)
        alone, _ = generate(module, params, np.asarray([p], np.int32), max_new_tokens=10, eos_token_id=None)
        np.testing.assert_array_equal(alone[0], tokens[i])  # batched == unbatched
    assert np.asarray(lengths).tolist() == [10, 10, 10]


def test_stops_at_eos_per_sequence(llm):
    module, params = llm
    prompt = np.random.default_rng(1).integers(3, 97, size=(1, 5)).astype(np.int32)
    free, _ = generate(module, params, prompt, max_new_tokens=8, eos_token_id=None)
    eos = int(free[0, 2])  # pretend the third generated token is EOS
    tokens, lengths = generate(module, params, prompt, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    first = int(np.nonzero(np.asarray(free[0]) == eos)[0][0])
    assert int(lengths[0]) == first + 1
    np.testing.assert_array_equal(tokens[0, :first + 1], free[0, :first + 1])
    assert np.all(np.asarray(tokens[0, first + 1:]) == 0)


def test_sampling_is_reproducible_from_its_seed(llm):
    module, params = llm
    prompt = np.random.default_rng(2).integers(3, 97, size=(2, 4)).astype(np.int32)
    kw = dict(max_new_tokens=12, eos_token_id=None, temperature=1.0, top_p=0.95)
    a, _ = generate(module, params, prompt, rng=jax.random.key(7), **kw)
    b, _ = generate(module, params, prompt, rng=jax.random.key(7), **kw)
    c, _ = generate(module, params, prompt, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_token(logits, jax.random.key(i), temperature=1.0, top_p=0.7)[0]) for i in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    tiny = {int(sample_token(logits, jax.random.key(i), temperature=1.0, top_p=1e-6)[0]) for i in range(50)}
    assert tiny == {0}


@pytest.mark.slow
def test_exo2ego_prefill_with_visual_tokens(tmp_path):
    from tests.torch_reference import FRAMES, build_videollama2
    from exo2ego_jax.convert import convert_videollama2
    build_videollama2(str(tmp_path / "vl2"))
    convert_videollama2(str(tmp_path / "vl2"), str(tmp_path / "out"), dtype="float32", mapper_width=4,
                        mapper_blocks=1, show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "out"))
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(2, FRAMES, 16, 16, 3)).astype(np.float32)
    ids = np.array([[1, -201, 11, 12, 13], [1, 14, -201, 15, 0]], np.int32)
    mask = ids != 0
    tokens, _ = generate(module, params, ids, mask, pixels, max_new_tokens=6, eos_token_id=None, fusion="tokens")
    for i in range(2):
        row = ids[i, :mask[i].sum()].tolist()
        want = []
        for _ in range(6):
            logits = module.apply({"params": params}, np.asarray([row + want]), pixels[i:i + 1], fusion="tokens")
            want.append(int(np.argmax(logits[0, -1])))
        assert np.asarray(tokens[i]).tolist() == want
