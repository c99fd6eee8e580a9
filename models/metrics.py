"""The metrics that the seed papers report.

Classification (the emotion papers): accuracy, weighted F1, specificity, Cohen's kappa and
the confusion matrix. Regression on sentiment in [-3, 3] (the LMF / TFN papers, CMU-MOSI
and MOSEI conventions): MAE, Pearson r, Acc-2 and Acc-7.

Inputs are array-likes (lists, numpy arrays, CPU tensors) of labels or scores; results are
Python floats, so they serialise to JSON as they are.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _labels(y_true, y_pred, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true and y_pred need the same non-zero length, got {t.size} and {p.size}")
    k = int(max(t.max(), p.max()) + 1) if num_classes is None else num_classes
    if t.min() < 0 or p.min() < 0 or max(t.max(), p.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    return t, p, k


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class (scikit-learn's layout)."""
    t, p, k = _labels(y_true, y_pred, num_classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def accuracy(y_true, y_pred) -> float:
    t, p, _ = _labels(y_true, y_pred, None)
    return float((t == p).mean())


def weighted_f1(y_true, y_pred, num_classes: int | None = None) -> float:
    """Per-class F1 averaged with weights proportional to each class's true count; a class
    never predicted nor present has F1 0 and weight 0 (scikit-learn's ``average="weighted"``)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0), cm.sum(1)
    denominator = predicted + actual
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float((f1 * actual).sum() / actual.sum())


def specificity(y_true, y_pred, num_classes: int | None = None, average: str | None = "macro"):
    """True-negative rate TN / (TN + FP) of each class, one-vs-rest; ``average="macro"``
    gives their unweighted mean, ``None`` the per-class array."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    total = cm.sum()
    fp = cm.sum(0) - np.diag(cm)
    tn = total - cm.sum(1) - fp
    per_class = np.divide(tn, tn + fp, out=np.zeros(len(cm)), where=(tn + fp) > 0)
    if average is None:
        return per_class
    if average != "macro":
        raise ValueError(f"average must be 'macro' or None, got {average!r}")
    return float(per_class.mean())


def cohen_kappa(y_true, y_pred, num_classes: int | None = None) -> float:
    """Agreement beyond chance: (p_o - p_e) / (1 - p_e), p_e from the two marginals."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    total = cm.sum()
    observed = np.trace(cm) / total
    expected = (cm.sum(0) * cm.sum(1)).sum() / total**2
    return float((observed - expected) / (1.0 - expected)) if expected < 1.0 else float("nan")


def _scores(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true and y_pred need the same non-zero length, got {t.size} and {p.size}")
    return t, p


def mae(y_true, y_pred) -> float:
    t, p = _scores(y_true, y_pred)
    return float(np.abs(t - p).mean())


def pearson_r(y_true, y_pred) -> float:
    """Pearson correlation; NaN when either side is constant."""
    t, p = _scores(y_true, y_pred)
    t, p = t - t.mean(), p - p.mean()
    denominator = np.sqrt((t * t).sum() * (p * p).sum())
    return float((t * p).sum() / denominator) if denominator > 0 else float("nan")


def acc2(y_true, y_pred, *, exclude_zero: bool = True) -> float:
    """Binary sentiment accuracy: positive (> 0) against negative. With ``exclude_zero`` (the
    MOSEI convention) clips whose true score is exactly 0 are left out; otherwise a score
    of 0 counts as negative."""
    t, p = _scores(y_true, y_pred)
    if exclude_zero:
        keep = t != 0
        t, p = t[keep], p[keep]
        if t.size == 0:
            raise ValueError("every true score is 0: Acc-2 with exclude_zero has nothing to count")
    return float(((t > 0) == (p > 0)).mean())


def acc7(y_true, y_pred) -> float:
    """Seven-class sentiment accuracy: both scores clipped to [-3, 3] and rounded to the
    nearest integer (halves to even, as numpy rounds)."""
    t, p = _scores(y_true, y_pred)
    return float((np.round(np.clip(t, -3, 3)) == np.round(np.clip(p, -3, 3))).mean())


def classification_report(y_true, y_pred, num_classes: int) -> dict:
    """Every classification metric, and the confusion matrix as nested lists."""
    return {
        "accuracy": accuracy(y_true, y_pred),
        "weighted_f1": weighted_f1(y_true, y_pred, num_classes),
        "specificity": specificity(y_true, y_pred, num_classes),
        "cohen_kappa": cohen_kappa(y_true, y_pred, num_classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, num_classes).tolist(),
    }


def regression_report(y_true, y_pred) -> dict:
    return {"mae": mae(y_true, y_pred), "pearson_r": pearson_r(y_true, y_pred),
            "acc2": acc2(y_true, y_pred), "acc7": acc7(y_true, y_pred)}


def plot_confusion_matrix(matrix, class_names: Sequence[str], path: str, *, title: str = "") -> None:
    """Save the confusion matrix as an image, counts in the cells, rows = true class."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    matrix = np.asarray(matrix)
    fig = Figure(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
