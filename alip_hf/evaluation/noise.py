"""Noise detection metrics: how well a per-row score separates clean from noisy image-text pairs.

Convention: a *higher* score means a *cleaner* pair (a gate weight, a similarity, a CLIP-score), and filtering
keeps the highest-scored rows. So the detection ROC AUC is the probability that a random clean row scores above a
random noisy one (ties count one half), i.e. `sklearn.metrics.roc_auc_score(is_clean, score)`.
"""

from __future__ import annotations

import numpy as np


def roc_auc(is_clean: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for telling clean rows (`is_clean` true) from noisy ones, by the rank-sum
    (Mann-Whitney U) formula with average ranks for ties; equal to `sklearn.metrics.roc_auc_score`.

    Args:
        is_clean: `(N,)` bool.
        scores: `(N,)` float, finite.
    Returns:
        The AUC in [0, 1]; NaN when one class is empty.
    """
    is_clean = np.asarray(is_clean, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(is_clean.sum()), int((~is_clean).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Rank of a tie group = mean of the 1-based ranks it spans.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][is_clean].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def top_fraction(scores: np.ndarray, fraction: float, keys: np.ndarray | None = None) -> np.ndarray:
    """`(N,)` bool mask of the `round(fraction * N)` highest scores; ties are broken by `keys` (ascending, e.g. the
    row ids) so the choice is deterministic whatever the row order."""
    scores = np.asarray(scores, dtype=np.float64)
    keep = int(round(fraction * len(scores)))
    secondary = np.arange(len(scores)) if keys is None else np.asarray(keys)
    order = np.lexsort((secondary, -scores))  # last key is the primary one
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:keep]] = True
    return mask


def precision_at_fraction(is_clean: np.ndarray, scores: np.ndarray, fraction: float,
                          keys: np.ndarray | None = None) -> dict[str, float]:
    """Keeping the `fraction` highest-scored rows: the share of kept rows that are clean, and the share of dropped
    rows that are noisy (NaN when nothing is kept / dropped)."""
    is_clean = np.asarray(is_clean, dtype=bool)
    kept = top_fraction(scores, fraction, keys)
    kept_clean = float(is_clean[kept].mean()) if kept.any() else float("nan")
    dropped_noisy = float((~is_clean[~kept]).mean()) if (~kept).any() else float("nan")
    return {"kept_clean_precision": kept_clean, "dropped_noisy_precision": dropped_noisy}


def detection_metrics(is_clean: np.ndarray, scores: dict[str, np.ndarray], kept_fraction: float,
                      keys: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """`{score name: {"auc", "kept_clean_precision", "dropped_noisy_precision"}}` over the rows where the score
    is finite (rows a model could not score are left out, and counted in `"rows"`)."""
    out = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        row_keys = None if keys is None else np.asarray(keys)[finite]
        out[name] = {"auc": roc_auc(is_clean[finite], values[finite]),
                     **precision_at_fraction(is_clean[finite], values[finite], kept_fraction, row_keys),
                     "rows": int(finite.sum())}
    return out


__all__ = ["detection_metrics", "precision_at_fraction", "roc_auc", "top_fraction"]
