"""Benchmark metrics others rely on.

multilabel_map(scores, labels)        Charades-Ego mAP: mean over classes with a positive of sklearn's AP.
mir_metrics(similarity, relevancy)    EPIC-KITCHENS-100 multi-instance retrieval, official semantics:
                                      mAP counts R == 1 as relevant; nDCG uses the graded R over the first
                                      #nonzero(R) ranks of each query, normalised by the ideal ordering.
parse_choice(text, num_options)       VideoLLaMA2-style letter parsing of a generated answer -> option index.
"""
from __future__ import annotations

import re

import numpy as np

from exo2ego_jax.data.prompts import LETTERS


def multilabel_map(scores, labels) -> float:
    """Mean average precision over classes; classes without any positive are skipped.

    scores [N, C] (higher = more likely), labels [N, C] in {0, 1}. Returns a fraction in [0, 1].
    """
    from sklearn.metrics import average_precision_score
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N, C]")
    aps = [average_precision_score(labels[:, c] > 0, scores[:, c]) for c in range(labels.shape[1])
           if (labels[:, c] > 0).any()]
    if not aps:
        raise ValueError("no class has a positive label: mAP is undefined")
    return float(np.mean(aps))


def _average_precision_rows(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AP of each row's ranking (descending similarity, stable ties); rows without a relevant item -> nan."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    rel = np.take_along_axis(relevant, order, axis=1).astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (precision * rel).sum(axis=1) / n_rel


def _ndcg_rows(similarity: np.ndarray, relevancy: np.ndarray) -> np.ndarray:
    """nDCG of each row: DCG over the first k = #nonzero(R) ranks, with graded gains R / log2(rank + 1)."""
    n = similarity.shape[1]
    k = (relevancy > 0).sum(axis=1, keepdims=True)
    discount = 1.0 / np.log2(np.arange(n) + 2.0)
    within_k = np.arange(n)[None, :] < k

    def dcg(order):
        gains = np.take_along_axis(relevancy, order, axis=1)
        return (gains * discount * within_k).sum(axis=1)

    actual = dcg(np.argsort(-similarity, axis=1, kind="stable"))
    ideal = dcg(np.argsort(-relevancy, axis=1, kind="stable"))
    with np.errstate(invalid="ignore", divide="ignore"):
        return actual / ideal


def mir_metrics(similarity, relevancy) -> dict:
    """Video-to-text and text-to-video mAP and nDCG (fractions) for a [num_videos, num_texts] similarity.

    relevancy [num_videos, num_texts] holds graded relevance in [0, 1] (1 = exact match). Queries without a
    relevant item are skipped, as in the official evaluation.
    """
    similarity = np.asarray(similarity, np.float64)
    relevancy = np.asarray(relevancy, np.float64)
    if similarity.shape != relevancy.shape or similarity.ndim != 2:
        raise ValueError(f"similarity {similarity.shape} and relevancy {relevancy.shape} must both be [videos, texts]")
    out = {}
    for name, sim, rel in (("v2t", similarity, relevancy), ("t2v", similarity.T, relevancy.T)):
        ap = _average_precision_rows(sim, rel == 1)
        nd = _ndcg_rows(sim, rel)
        out[f"map_{name}"] = float(np.nanmean(ap))
        out[f"ndcg_{name}"] = float(np.nanmean(nd))
    out["map_avg"] = (out["map_v2t"] + out["map_t2v"]) / 2
    out["ndcg_avg"] = (out["ndcg_v2t"] + out["ndcg_t2v"]) / 2
    return {k: out[k] for k in ("map_v2t", "map_t2v", "map_avg", "ndcg_v2t", "ndcg_t2v", "ndcg_avg")}


def parse_choice(text: str, num_options: int) -> int | None:
    """Option index from a generated answer, or None.

    Accepted, in this order: a leading letter ("B", "(B)", "B.", "B)", "Answer: B", "The best answer is B"),
    then the first stand-alone option letter anywhere ("... so (C) is correct"), as VideoLLaMA2's scripts take
    the first letter they find (but a capital inside a word, like the B of "Because", does not count).
    Letters beyond `num_options` do not count.
    """
    if not text:
        return None
    letters = LETTERS[:num_options]
    s = text.strip()
    s = re.sub(r"^(the\s+)?(best\s+)?(answer|option|choice)(\s+is)?\s*[:：]?\s*", "", s, flags=re.IGNORECASE)
    m = re.match(rf"^\(?([{letters}])\)?(?:[\s.:)\]，,]|$)", s)
    if m:
        return letters.index(m.group(1))
    found = re.search(rf"(?:^|[\s(\[])([{letters}])(?=[\s).\],:]|$)", s)
    return letters.index(found.group(1)) if found else None
