"""The Exo2Ego composite: VideoLLaMA2 conversion and parity with a PyTorch composition, splicing, shapes."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import exo2ego_jax
from exo2ego_jax.convert import CheckpointError, convert_videollama2
from exo2ego_jax.models.exo2ego import Exo2EgoConfig, splice_visual
from tests.helpers import composite_logits_and_loss
from tests.torch_reference import FRAMES, build_videollama2


def torch_reference_logits(clip, stc, llm, pixels, ids, lengths):
    """VideoLLaMA2's prepare_inputs_labels_for_multimodal, in PyTorch: splice, right-pad with zeros."""
    import torch
    b, t = pixels.shape[:2]
    with torch.no_grad():
        px = torch.from_numpy(pixels.reshape((b * t,) + pixels.shape[2:]).transpose(0, 3, 1, 2))
        feats = clip(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        visual = stc(feats.reshape(b, t, feats.shape[1], feats.shape[2]))
        embed = llm.get_input_embeddings()
        rows = []
        for i in range(b):
            row = torch.from_numpy(ids[i, :lengths[i]])
            p = int((row == -201).nonzero()[0, 0])
            rows.append(torch.cat([embed(row[:p]), visual[i], embed(row[p + 1:])]))
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(b, width, rows[0].shape[1])
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, r in enumerate(rows):
            embeds[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = 1
        return llm(inputs_embeds=embeds, attention_mask=mask).logits.numpy(), mask.numpy().astype(bool)


@pytest.fixture(scope="module")
def videollama2(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("vl2"))
    refs = build_videollama2(src)
    out = str(tmp_path_factory.mktemp("vl2_jax"))
    convert_videollama2(src, out, dtype="float32", mapper_width=4, mapper_blocks=2, show_progress=False)
    return refs, src, out


def batch(seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(2, FRAMES, 16, 16, 3)).astype(np.float32)
    ids = rng.integers(3, 97, size=(2, 9)).astype(np.int64)
    ids[0, 3] = -201
    ids[1, 1] = -201
    lengths = [9, 6]
    mask = (np.arange(9)[None] < np.asarray(lengths)[:, None])
    ids = np.where(mask, ids, 0)
    return pixels, ids, mask, lengths


def test_composite_matches_pytorch_composition(videollama2):
    (clip, stc, llm), _, out = videollama2
    module, params = exo2ego_jax.load_pretrained(out)
    pixels, ids, mask, lengths = batch()
    ours = np.asarray(jax.jit(lambda p, i, x, m: module.apply({"params": p}, i, x, attention_mask=m, fusion="none"))(
        params, ids, pixels, mask))
    n = module.config.num_visual_tokens("none")
    assert n == 27 and ours.shape == (2, 9 - 1 + n, 97)
    ref, ref_mask = torch_reference_logits(clip, stc, llm, pixels, ids, lengths)
    for i, length in enumerate(lengths):
        valid = length - 1 + n
        assert np.abs(ours[i, :valid] - ref[i, :valid]).max() <= 1e-4


def test_visual_tokens_entry_point_and_fusions(videollama2):
    _, _, out = videollama2
    module, params = exo2ego_jax.load_pretrained(out)
    pixels = batch()[0]
    apply = lambda **kw: module.apply({"params": params}, pixels, method="visual_tokens", **kw)
    none = apply(fusion="none")
    tokens = apply(fusion="tokens")
    frames = apply(fusion="frames")
    assert none.shape == (2, 27, 64) and tokens.shape == (2, 54, 64) and frames.shape == (2, 54, 64)
    np.testing.assert_allclose(tokens[:, :27], none, atol=1e-5)  # x first, then F(x)
    # "frames": one connector pass over x's then F(x)'s frames, each clip sampled on its own: the same tokens
    np.testing.assert_allclose(frames, tokens, atol=1e-5)
    mapped = apply(fusion="mapped")
    np.testing.assert_allclose(mapped, tokens[:, 27:], atol=1e-5)  # F(x) alone
    assert apply(view="exo", fusion="none").shape == (2, 27, 64)
    # both encoders start from the same tower
    np.testing.assert_allclose(apply(view="exo", fusion="none"), none, atol=1e-6)


def test_loss_ignores_visual_positions(videollama2):
    _, _, out = videollama2
    module, params = exo2ego_jax.load_pretrained(out)
    pixels, ids, mask, _ = batch(1)
    labels = np.where(mask & (ids != -201), ids, -100)
    logits, loss = composite_logits_and_loss(module, params, ids, pixels, mask=mask, labels=labels, fusion="none")
    # hand-computed: targets are the text tokens after the clip, predicted one position earlier
    n = 27
    lp = jax.nn.log_softmax(np.asarray(logits), -1)
    total, count = 0.0, 0
    for i in range(2):
        p = int(np.nonzero(ids[i] == -201)[0][0])
        spliced = list(labels[i, :p]) + [-100] * n + list(labels[i, p + 1:])
        for j in range(1, len(spliced)):
            if spliced[j] != -100:
                total -= float(lp[i, j - 1, spliced[j]])
                count += 1
    assert abs(float(loss) - total / count) < 1e-5


def test_splice_positions_and_buckets(videollama2):
    text = jnp.arange(2 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 1)
    ids = jnp.array([[1, -201, 2, 3, 0], [1, 2, 3, -201, 4]])
    visual = -jnp.ones((2, 3, 1))
    embeds, mask, labels = splice_visual(text, ids, visual, ids != 0, ids, video_token_index=-201, ignore_index=-100)
    np.testing.assert_array_equal(embeds[0, :, 0], [0, -1, -1, -1, 2, 3, 4])
    np.testing.assert_array_equal(embeds[1, :, 0], [5, 6, 7, -1, -1, -1, 9])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(labels[1], [1, 2, 3, -100, -100, -100, 4])
    _, _, out = videollama2
    module, params = exo2ego_jax.load_pretrained(out, length_buckets=(40, 64))
    pixels, ids_b, mask_b, _ = batch()
    bucketed = module.apply({"params": params}, ids_b, pixels, attention_mask=mask_b, fusion="none")
    plain_module, _ = exo2ego_jax.load_pretrained(out)
    plain = plain_module.apply({"params": params}, ids_b, pixels, attention_mask=mask_b, fusion="none")
    assert bucketed.shape == plain.shape == (2, 35, 97)
    np.testing.assert_allclose(bucketed[0], plain[0], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the largest of length_buckets"):
        exo2ego_jax.load_pretrained(out, length_buckets=(16,))[0].apply(
            {"params": params}, ids_b, pixels, attention_mask=mask_b, fusion="none")


def test_two_placeholders_in_a_row_is_an_error(videollama2):
    _, _, out = videollama2
    module, params = exo2ego_jax.load_pretrained(out)
    pixels, ids, mask, _ = batch()
    ids[0, 5] = -201
    with pytest.raises(ValueError, match=r"rows \[0\].*more than one video placeholder"):
        module.apply({"params": params}, ids, pixels, attention_mask=mask, fusion="none")


def test_separate_projector_file(tmp_path):
    import torch
    (clip, stc, llm) = build_videollama2(str(tmp_path / "base"), with_projector=False)
    torch.save({f"model.mm_projector.{k}": v for k, v in stc.state_dict().items()}, tmp_path / "mm_projector.bin")
    convert_videollama2(str(tmp_path / "base"), str(tmp_path / "out"), dtype="float32", mapper_width=4,
                        mapper_blocks=1, mm_projector=str(tmp_path / "mm_projector.bin"), show_progress=False)
    module, params = exo2ego_jax.load_pretrained(str(tmp_path / "out"))
    pixels, ids, mask, lengths = batch()
    ours = np.asarray(module.apply({"params": params}, ids, pixels, attention_mask=mask, fusion="none"))
    ref, _ = torch_reference_logits(clip, stc, llm, pixels, ids, lengths)
    assert np.abs(ours[0, :35] - ref[0, :35]).max() <= 1e-4
    # a file with pickled code is refused (weights_only=True)
    torch.save({"model.mm_projector.x": object()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        convert_videollama2(str(tmp_path / "base"), str(tmp_path / "out2"), mm_projector=str(tmp_path / "evil.bin"),
                            show_progress=False)


def test_missing_projector_is_named(tmp_path):
    build_videollama2(str(tmp_path / "base"), with_projector=False)
    with pytest.raises(CheckpointError, match=r"no connector.*--mm_projector"):
        convert_videollama2(str(tmp_path / "base"), str(tmp_path / "out"), show_progress=False)


def test_full_size_shapes_without_compute():
    from exo2ego_jax.models import registry
    cfg = Exo2EgoConfig()
    assert cfg.num_visual_tokens("none") == 1521 and cfg.num_visual_tokens("tokens") == 3042
    assert cfg.num_visual_tokens("frames") == 3042  # each stream sampled as its own clip: no shared window
    module = registry.build_module("exo2ego", cfg)
    ids = jnp.zeros((1, 32), jnp.int32).at[0, 5].set(-201)
    pixels = jax.ShapeDtypeStruct((1, 16, 336, 336, 3), jnp.float32)
    params = registry.abstract_params("exo2ego", module)
    logits = jax.eval_shape(lambda p, x: module.apply(p, ids, x), {"params": params}, pixels)
    assert logits.shape == (1, 31 + 3042, 32000)
    visual = jax.eval_shape(lambda p, x: module.apply(p, x, method="visual_tokens", fusion="none"), {"params": params},
                            pixels)
    assert visual.shape == (1, 1521, 4096)
    counts = {k: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(v)) for k, v in
              jax.tree.map(lambda x: x, __import__("flax").linen.meta.unbox(params)).items()}
    assert abs(counts["connector"] - 489.2e6) < 0.1e6
    assert counts["llm"] == 7_241_732_096
    assert counts["ego_encoder"] == counts["exo_encoder"] == 290_909_184  # 23 of 24 CLIP-L layers
