"""PNG plots for the HTML report, drawn with matplotlib's Agg canvas (no pyplot, no display needed).

Scores follow the library's sign convention: positive = harmful (raises the validation loss). When looking
for mislabeled ("flipped") training examples, examples are ranked by score, largest first.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from datainf.errors import DataInfError

#: colours of the methods, in order (colour-blind friendly "tab" palette)
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def as_vector(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 numpy copy of a numpy array, torch tensor or sequence; shape (n,)."""
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().to("cpu").double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataInfError(f"{name}: expected a 1-D array of one score per training example, got shape "
                           f"{tuple(array.shape)}")
    return array


def _positives(positives: Any, n: int) -> np.ndarray:
    flags = np.asarray(positives).astype(bool).reshape(-1)
    if flags.shape[0] != n:
        raise DataInfError(f"positives: expected {n} flags (one per training example), got {flags.shape[0]}")
    return flags


def roc_points(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of finding the positives by ranking examples by score, largest first.

    scores: (n,) numbers; positives: (n,) booleans. Tied scores form a single step (one point per distinct
    score). Returns ``(fpr, tpr)``, each of shape (n_distinct + 1,), starting at (0, 0) and ending at (1, 1)
    (a rate whose class is empty is 0 throughout).
    """
    values = as_vector(scores, "scores")
    flags = _positives(positives, values.shape[0])
    if values.size == 0:
        raise DataInfError("roc_points: scores is empty; pass one score per training example")
    order = np.argsort(-values, kind="stable")
    sorted_values, sorted_flags = values[order], flags[order]
    true_pos = np.cumsum(sorted_flags)
    false_pos = np.cumsum(~sorted_flags)
    # the last position of each run of equal scores: thresholds between distinct values
    last_of_run = np.r_[np.nonzero(np.diff(sorted_values))[0], values.shape[0] - 1]
    true_pos = np.r_[0, true_pos[last_of_run]]
    false_pos = np.r_[0, false_pos[last_of_run]]
    n_pos, n_neg = int(flags.sum()), int((~flags).sum())
    tpr = true_pos / n_pos if n_pos else np.zeros_like(true_pos, dtype=np.float64)
    fpr = false_pos / n_neg if n_neg else np.zeros_like(false_pos, dtype=np.float64)
    return fpr.astype(np.float64), tpr.astype(np.float64)


def roc_auc(scores: Any, positives: Any) -> float | None:
    """ROC AUC (:func:`datainf.metrics.roc_auc`, ties count one half); None without both classes."""
    from datainf import metrics

    values = as_vector(scores, "scores")
    flags = _positives(positives, values.shape[0])
    if flags.all() or not flags.any():
        return None
    return metrics.roc_auc(values, flags)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def roc_curve_png(scores: Mapping[str, Any], positives: Any) -> bytes:
    """PNG bytes of the ROC curves of every method for finding the positives (flipped labels).

    scores: method name -> (n,) scores, ranked largest first; positives: (n,) booleans.
    """
    if not scores:
        raise DataInfError("roc_curve_png: scores is empty; pass at least one method's (n,) scores")
    figure = Figure(figsize=(5.6, 4.6))
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="random (AUC 0.500)")
    for index, (name, values) in enumerate(scores.items()):
        fpr, tpr = roc_points(values, positives)
        auc = roc_auc(values, positives)
        label = f"{name} (AUC {auc:.3f})" if auc is not None else f"{name} (AUC n/a)"
        axes.plot(fpr, tpr, color=_COLOURS[index % len(_COLOURS)], linewidth=2, label=label)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (clean examples flagged)")
    axes.set_ylabel("true positive rate (flipped found)")
    axes.set_title("Finding flipped labels, ranked by score (largest first)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8, frameon=False)
    figure.tight_layout()
    return _png(figure)


def histogram_png(scores: Mapping[str, Any], positives: Any, *, bins: int = 30,
                  labels: tuple[str, str] = ("flipped", "clean")) -> bytes:
    """PNG bytes of one histogram panel per method: scores of the positives vs the rest.

    scores: method name -> (n,) scores; positives: (n,) booleans; labels: legend names of (positives, rest).
    Bins are shared by the two groups of one panel; each group's bars sum to 1 (fraction of the group) so
    both groups are visible whatever their sizes.
    """
    if not scores:
        raise DataInfError("histogram_png: scores is empty; pass at least one method's (n,) scores")
    n_methods = len(scores)
    columns = min(2, n_methods)
    rows = (n_methods + columns - 1) // columns
    figure = Figure(figsize=(5.2 * columns, 3.3 * rows))
    for index, (name, values) in enumerate(scores.items()):
        array = as_vector(values, f"scores[{name!r}]")
        flags = _positives(positives, array.shape[0])
        axes = figure.add_subplot(rows, columns, index + 1)
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if low == high:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
        for group, colour, label in ((~flags, "#7f9fbf", labels[1]), (flags, "#d62728", labels[0])):
            if group.any():
                weights = np.full(int(group.sum()), 1.0 / int(group.sum()))
                axes.hist(array[group], bins=edges, weights=weights, alpha=0.6, color=colour,
                          label=f"{label} ({int(group.sum())})")
        axes.axvline(0.0, color="#444444", linewidth=0.8)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("score  (negative = helpful, positive = harmful)", fontsize=8)
        axes.set_ylabel("fraction of group", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    return _png(figure)
