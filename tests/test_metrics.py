"""Metric functions against hand-computed values and against scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score

from exo2ego_jax.eval.metrics import mir_metrics, multilabel_map, parse_choice


def test_multilabel_map_hand_computed_and_skips_empty_classes():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.6, 0.9]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    # class 0: ranking 0.9(+) 0.8(-) 0.1(+) -> AP = (1 + 2/3) / 2; class 1: 0.7(+) 0.6(+) 0.1(-) -> 1;
    # class 2 has no positive: skipped
    assert multilabel_map(scores, labels) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_multilabel_map_matches_sklearn_macro():
    rng = np.random.default_rng(0)
    scores = rng.random((50, 7))
    labels = (rng.random((50, 7)) < 0.3).astype(int)
    assert multilabel_map(scores, labels) == pytest.approx(average_precision_score(labels, scores, average="macro"))


def test_mir_hand_computed():
    sim = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.3]])
    rel = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    m = mir_metrics(sim, rel)
    # v2t mAP: video 0 ranks t0(1) t2(.5) t1 -> relevant {t0}: AP 1; video 1 ranks t1 t2 t0 -> {t1, t2}: AP 1
    assert m["map_v2t"] == pytest.approx(1.0)
    # t2v: t0 ranks v0(1) v1 -> AP 1; t1 ranks v1(1) -> 1; t2 ranks v0(.5, not ==1) v1(1) -> AP 1/2
    assert m["map_t2v"] == pytest.approx((1 + 1 + 0.5) / 3)
    # nDCG v2t: video 0, k = 2 nonzero: DCG = 1 + 0.5/log2(3) = IDCG -> 1; video 1 likewise 1
    assert m["ndcg_v2t"] == pytest.approx(1.0)
    # t2 query: k = 2, ranks v0 (0.5) then v1 (1): DCG = 0.5 + 1/log2(3); IDCG = 1 + 0.5/log2(3)
    t2 = (0.5 + 1 / np.log2(3)) / (1 + 0.5 / np.log2(3))
    assert m["ndcg_t2v"] == pytest.approx((1 + 1 + t2) / 3)
    assert m["map_avg"] == pytest.approx((m["map_v2t"] + m["map_t2v"]) / 2)


def test_mir_matches_sklearn_per_query():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(12, 15))
    rel = np.where(rng.random((12, 15)) < 0.3, rng.choice([0.25, 0.5, 1.0], size=(12, 15)), 0.0)
    rel[np.arange(12), np.arange(12)] = 1.0
    m = mir_metrics(sim, rel)
    for name, s, r in (("v2t", sim, rel), ("t2v", sim.T, rel.T)):
        aps = [average_precision_score(r[i] == 1, s[i]) for i in range(len(s)) if (r[i] == 1).any()]
        ndcgs = [ndcg_score(r[i:i + 1], s[i:i + 1], k=int((r[i] > 0).sum())) for i in range(len(s)) if (r[i] > 0).any()]
        assert m[f"map_{name}"] == pytest.approx(np.mean(aps))
        assert m[f"ndcg_{name}"] == pytest.approx(np.mean(ndcgs))


@pytest.mark.parametrize("text,n,want", [
    ("B", 5, 1), ("(C) the person cuts", 5, 2), ("D. because", 5, 3), ("Answer: A", 5, 0),
    ("The best answer is: E", 5, 4), ("  b) lowercase is not a letter option", 5, None),
    ("I think (B) is right", 5, 1), ("F", 5, None), ("A or B", 5, 0), ("Because the cup (D) is red", 5, 3), ("", 5, None),
    ("The answer is C.", 3, 2), ("E", 4, None),
])
def test_parse_choice(text, n, want):
    assert parse_choice(text, n) == want


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"must both be \[N, C\]"):
        multilabel_map(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="videos, texts"):
        mir_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
