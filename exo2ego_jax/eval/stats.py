"""Uncertainty of accuracies: Wilson intervals for one run, bootstrap over items and seeds for several, and the
paired bootstrap for the difference of two models scored on the same items with the same seeds."""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well behaved near 0 and 1, unlike the normal one)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _resample(shape: tuple[int, int], draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap index sets: seeds [draws, S] and items [draws, N], both drawn with replacement."""
    rng = np.random.default_rng(seed)
    seeds, items = shape
    return rng.integers(0, seeds, size=(draws, seeds)), rng.integers(0, items, size=(draws, items))


def _means(matrix: np.ndarray, seed_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """Mean of matrix[s, i] over each draw's seeds and items, without materialising [draws, S, N]."""
    out = np.empty(len(seed_idx))
    for d, (s, i) in enumerate(zip(seed_idx, item_idx)):
        per_item = np.bincount(i, minlength=matrix.shape[1]).astype(np.float64)  # item multiplicities
        out[d] = (matrix[s] @ per_item).mean() / len(i)
    return out


def bootstrap_mean(correct, *, draws: int = 10000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Accuracy over seeds and items, with a percentile interval from resampling both.

    correct: [seeds, items] 0/1 (a 1-D array is one seed).
    """
    m = np.atleast_2d(np.asarray(correct, np.float64))
    seed_idx, item_idx = _resample(m.shape, draws, seed)
    boots = _means(m, seed_idx, item_idx)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"mean": float(m.mean()), "ci95": [float(lo), float(hi)]}


def paired_bootstrap(a, b, *, draws: int = 10000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Difference mean(a) - mean(b) of two models on the same items and seeds, with a percentile interval.

    a, b: [seeds, items] 0/1 correctness, row s of both from runs with seed s and column i the same question.
    Each draw resamples items and seeds once and applies the same draw to both models (paired), so item
    difficulty and seed luck shared by the two cancel.
    """
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same seeds and items: shapes {a.shape} and {b.shape}")
    seed_idx, item_idx = _resample(a.shape, draws, seed)
    boots = _means(a - b, seed_idx, item_idx)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"diff": float((a - b).mean()), "ci95": [float(lo), float(hi)]}
