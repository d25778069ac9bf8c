"""Evaluation metrics for influence scores: AUC, precision/recall at k, Pearson and Spearman correlations.

Plain numpy; inputs may be lists, numpy arrays or torch tensors. Ties get average ranks everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datainf.errors import DataInfError


def _vector(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 array of finite values."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataInfError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise DataInfError(f"{name} holds NaN or infinite values; drop or fix them")
    return array


def _mask(positives: Any, n: int) -> np.ndarray:
    if hasattr(positives, "detach"):
        positives = positives.detach().cpu().numpy()
    mask = np.asarray(positives)
    if mask.ndim != 1 or mask.shape[0] != n:
        raise DataInfError(
            f"positives must be a 1-D mask of length {n} (one per score), got shape {tuple(mask.shape)}"
        )
    if mask.dtype != np.bool_:
        if not np.all((mask == 0) | (mask == 1)):
            raise DataInfError("positives must be a boolean mask (True/False or 1/0)")
        mask = mask.astype(bool)
    return mask


def _scores_and_mask(scores: Any, positives: Any, need_negatives: bool) -> tuple[np.ndarray, np.ndarray]:
    s = _vector(scores, "scores")
    mask = _mask(positives, s.shape[0])
    if not mask.any():
        raise DataInfError("positives has no True entry; the metric needs at least one positive")
    if need_negatives and mask.all():
        raise DataInfError("positives is all True; the metric needs at least one negative")
    return s, mask


def average_ranks(values: Any) -> np.ndarray:
    """Ranks 1..n of ``values`` (shape (n,)), tied values sharing the mean of their ranks."""
    x = _vector(values, "values")
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # start of each run of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.shape[0]]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty_like(x)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties count 1/2.

    scores: (n,), larger = more likely positive. positives: (n,) boolean mask.
    """
    s, mask = _scores_and_mask(scores, positives, need_negatives=True)
    ranks = average_ranks(s)
    n_pos = int(mask.sum())
    n_neg = s.shape[0] - n_pos
    u_statistic = ranks[mask].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def _positives_in_top_k(s: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Expected number of positives among the k largest scores, ties at the cut broken at random."""
    n = s.shape[0]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise DataInfError(f"k must be an integer in 1..{n} (the number of scores), got {k!r}")
    threshold = np.sort(s)[::-1][k - 1]
    above = s > threshold
    tied = s == threshold
    n_above = int(above.sum())
    return float(mask[above].sum() + (k - n_above) * mask[tied].sum() / tied.sum())


def precision_at_k(scores: Any, positives: Any, k: int) -> float:
    """Share of the top k examples by score that are positive. scores, positives: (n,)."""
    s, mask = _scores_and_mask(scores, positives, need_negatives=False)
    return _positives_in_top_k(s, mask, k) / k


def recall_at_k(scores: Any, positives: Any, k: int) -> float:
    """Share of all positives that rank among the top k by score (the detection rate after inspecting k).

    scores, positives: (n,). Ties at the cut count fractionally (their expected share under a random order).
    """
    s, mask = _scores_and_mask(scores, positives, need_negatives=False)
    return _positives_in_top_k(s, mask, k) / float(mask.sum())


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape[0] != y.shape[0]:
        raise DataInfError(f"a and b differ in length ({x.shape[0]} vs {y.shape[0]}); pass paired values")
    if x.shape[0] < 2:
        raise DataInfError("a correlation needs at least 2 pairs")
    return x, y


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two paired vectors of shape (n,)."""
    x, y = _pair(a, b)
    x = x - x.mean()
    y = y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    if norm == 0:
        raise DataInfError("a correlation is undefined when a or b is constant")
    return float(np.clip((x * y).sum() / norm, -1.0, 1.0))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks) of two vectors of shape (n,)."""
    x, y = _pair(a, b)
    return pearson(average_ranks(x), average_ranks(y))


def method_summary(per_example: dict[str, Any], flagged: Any = None, reference: str | None = None
                   ) -> dict[str, dict[str, float | None]]:
    """Per method: the AUC of its scores (n,) against a mask of known-bad examples (``flagged``, e.g.
    flipped labels; ranked most harmful first) and its Pearson / Spearman correlation with ``reference``'s
    scores when that method is present (the exact one: ``datainf.estimators.defaults.REFERENCE_METHOD``). Missing quantities are left out, never filled with placeholders."""
    out: dict[str, dict[str, float | None]] = {}
    mask = None if flagged is None else _mask(flagged, len(next(iter(per_example.values()))))
    for method, values in per_example.items():
        entry: dict[str, float | None] = {}
        if mask is not None and 0 < mask.sum() < len(mask):
            entry["auc"] = roc_auc(values, mask)
        if reference in per_example:
            entry["pearson_with_exact"] = pearson(values, per_example[reference])
            entry["spearman_with_exact"] = spearman(values, per_example[reference])
        out[method] = entry
    return out
