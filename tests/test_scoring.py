"""Log-likelihood option scoring: per-option mean token loss equals a hand computation; chunking is invisible."""
import numpy as np
import pytest
import jax

import exo2ego_jax
from exo2ego_jax.serve.scoring import build_option_rows, option_losses
from tests.helpers import choose_by_likelihood, composite_logits_and_loss


def manual_loss(module, params, prompt, option):
    ids = np.asarray([prompt + option])
    logp = np.asarray(jax.nn.log_softmax(module.apply({"params": params}, ids)[0], -1))
    return -np.mean([logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(option)])


def test_option_losses_match_hand_computation_and_chunking(llm):
    module, params = llm
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (5, 3)]
    options = [[rng.integers(3, 97, size=k).tolist() for k in (1, 3, 2)], [[7, 8], [9], [10, 11, 12], [13]]]
    got = option_losses(module, params, prompts, options, chunk=3)
    assert [len(g) for g in got] == [3, 4]
    for q, (prompt, opts) in enumerate(zip(prompts, options)):
        want = [manual_loss(module, params, prompt, o) for o in opts]
        np.testing.assert_allclose(got[q], want, rtol=1e-5, atol=1e-5)
    same = option_losses(module, params, prompts, options, chunk=16)
    for a, b in zip(got, same):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert choose_by_likelihood(module, params, prompts, options) == [int(np.argmin(g)) for g in got]


def test_rows_and_bad_input():
    ids, mask, labels, owners = build_option_rows([[1, 2]], [[[3], [4, 5]]])
    np.testing.assert_array_equal(ids, [[1, 2, 3, 0], [1, 2, 4, 5]])
    np.testing.assert_array_equal(labels, [[-100, -100, 3, -100], [-100, -100, 4, 5]])
    np.testing.assert_array_equal(owners, [0, 0])
    with pytest.raises(ValueError, match="question 0 has an empty option"):
        build_option_rows([[1]], [[[2], []]])
    with pytest.raises(ValueError, match="question 0 has no options"):
        build_option_rows([[1]], [[]])


@pytest.mark.slow
def test_exo2ego_options_use_each_questions_clip(tmp_path):
    from tests.torch_reference import FRAMES, build_videollama2
    from exo2ego_jax.convert import convert_videollama2
    build_videollama2(str(tmp_path / "vl2"))
    convert_videollama2(str(tmp_path / "vl2"), str(tmp_path / "out"), dtype="float32", mapper_width=4,
                        mapper_blocks=1, show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "out"))
    pixels = np.random.default_rng(4).normal(size=(2, FRAMES, 16, 16, 3)).astype(np.float32)
    prompts = [[1, -201, 20, 21], [1, 22, -201]]
    options = [[[30, 31], [32]], [[33], [34, 35, 36]]]
    got = option_losses(module, params, prompts, options, pixels=pixels, fusion="none", chunk=4)
    for q in range(2):
        for k, option in enumerate(options[q]):
            ids = np.asarray([prompts[q] + option])
            labels = np.asarray([[-100] * len(prompts[q]) + option])
            _, loss = composite_logits_and_loss(module, params, ids, pixels[q:q + 1], labels=labels, fusion="none")
            assert abs(float(loss) - got[q][k]) < 1e-5
