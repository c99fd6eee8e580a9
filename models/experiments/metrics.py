"""The metrics that the seed papers report, computed by scikit-learn and SciPy.

Classification (the emotion papers): accuracy; precision, recall and F1, per class and
averaged (macro: the unweighted mean over classes; weighted: weights proportional to each
class's true count), which together are 002's classification report; specificity; Cohen's
kappa; the confusion matrix. Regression on sentiment in [-3, 3] (the LMF / TFN papers,
CMU-MOSI and MOSEI conventions): MAE, RMSE, Pearson r, Acc-2 and Acc-7. Significance of
one method against another (000's Table 6 gives p-values): a paired test over seeds and
McNemar's test on two methods' predictions for the same test set.

Inputs are array-likes (lists, numpy arrays, CPU tensors) of labels or scores; results are
Python floats (or lists and dicts of them), so they serialise to JSON as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import sklearn.metrics as skm
from scipy import stats

AVERAGES = ("macro", "weighted", None)


def _labels(y_true, y_pred, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Both label arrays as int64 and the class list ``0 .. K-1`` (K from the data when
    ``num_classes`` is None), so that every metric sees the classes that never occur too."""
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true and y_pred need the same non-zero length, got {t.size} and {p.size}")
    k = int(max(t.max(), p.max()) + 1) if num_classes is None else num_classes
    if t.min() < 0 or p.min() < 0 or max(t.max(), p.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    return t, p, list(range(k))


def _check_average(average: str | None) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    t, p, labels = _labels(y_true, y_pred, num_classes)
    return skm.confusion_matrix(t, p, labels=labels)


def accuracy(y_true, y_pred) -> float:
    t, p, _ = _labels(y_true, y_pred, None)
    return float(skm.accuracy_score(t, p))


def _precision_recall_f1(y_true, y_pred, num_classes, average, which: int):
    _check_average(average)
    t, p, labels = _labels(y_true, y_pred, num_classes)
    # A class never predicted has precision 0, one never present recall 0 (and F1 0):
    # zero_division=0 rather than a warning and NaN.
    value = skm.precision_recall_fscore_support(t, p, labels=labels, average=average, zero_division=0)[which]
    return value.astype(np.float64) if average is None else float(value)


def precision(y_true, y_pred, num_classes: int | None = None, average: str | None = "macro"):
    """TP / (TP + FP) of each class (0 for a class never predicted); ``average`` "macro",
    "weighted" (by true count) or None for the (K,) per-class array."""
    return _precision_recall_f1(y_true, y_pred, num_classes, average, 0)


def recall(y_true, y_pred, num_classes: int | None = None, average: str | None = "macro"):
    """TP / (TP + FN) of each class (0 for a class never present); averaged as :func:`precision`.
    Weighted recall equals accuracy."""
    return _precision_recall_f1(y_true, y_pred, num_classes, average, 1)


def f1(y_true, y_pred, num_classes: int | None = None, average: str | None = "macro"):
    """Per-class F1 = 2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall
    (0 for a class neither predicted nor present); averaged as :func:`precision`."""
    return _precision_recall_f1(y_true, y_pred, num_classes, average, 2)


def weighted_f1(y_true, y_pred, num_classes: int | None = None) -> float:
    """Per-class F1 averaged with weights proportional to each class's true count; a class
    never predicted nor present has F1 0 and weight 0."""
    return f1(y_true, y_pred, num_classes, average="weighted")


def specificity(y_true, y_pred, num_classes: int | None = None, average: str | None = "macro"):
    """True-negative rate TN / (TN + FP) of each class, one-vs-rest (0 where TN + FP = 0);
    ``average="macro"`` gives their unweighted mean, ``None`` the per-class array."""
    if average not in ("macro", None):
        raise ValueError(f"average must be 'macro' or None, got {average!r}")
    t, p, labels = _labels(y_true, y_pred, num_classes)
    # (K, 2, 2) one-vs-rest matrices [[TN, FP], [FN, TP]]; scikit-learn has no specificity.
    one_vs_rest = skm.multilabel_confusion_matrix(t, p, labels=labels)
    tn, fp = one_vs_rest[:, 0, 0], one_vs_rest[:, 0, 1]
    per_class = np.divide(tn, tn + fp, out=np.zeros(len(labels)), where=(tn + fp) > 0)
    return per_class if average is None else float(per_class.mean())


def cohen_kappa(y_true, y_pred, num_classes: int | None = None) -> float:
    """Agreement beyond chance: (p_o - p_e) / (1 - p_e), p_e from the two marginals; NaN
    when p_e = 1 (both sides one and the same class throughout)."""
    t, p, labels = _labels(y_true, y_pred, num_classes)
    if np.all(t == t[0]) and np.all(p == t[0]):
        return float("nan")  # 0 / 0; scikit-learn would warn before returning NaN
    return float(skm.cohen_kappa_score(t, p, labels=labels))


def _scores(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true and y_pred need the same non-zero length, got {t.size} and {p.size}")
    return t, p


def mae(y_true, y_pred) -> float:
    """Mean absolute error, mean |y - y'|."""
    t, p = _scores(y_true, y_pred)
    return float(skm.mean_absolute_error(t, p))


def rmse(y_true, y_pred) -> float:
    """Root mean squared error, sqrt(mean (y - y')^2) (001's RMSE)."""
    t, p = _scores(y_true, y_pred)
    return float(skm.root_mean_squared_error(t, p))


def pearson_r(y_true, y_pred) -> float:
    """Pearson correlation cov(y, y') / (sd(y) sd(y')); NaN when either side is constant."""
    t, p = _scores(y_true, y_pred)
    if np.all(t == t[0]) or np.all(p == p[0]):
        return float("nan")  # zero variance: SciPy would warn and return NaN too
    return float(stats.pearsonr(t, p).statistic)


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
    return float(skm.accuracy_score(t > 0, p > 0))


def acc7(y_true, y_pred) -> float:
    """Seven-class sentiment accuracy: both scores clipped to [-3, 3] and rounded to the
    nearest integer (halves to even, as numpy rounds)."""
    t, p = _scores(y_true, y_pred)
    return float(skm.accuracy_score(np.round(np.clip(t, -3, 3)), np.round(np.clip(p, -3, 3))))


def classification_report(y_true, y_pred, num_classes: int) -> dict:
    """Every classification metric: the scalars, ``per_class`` lists (precision, recall,
    F1, specificity and support = true count, in class order; with the macro and weighted
    averages this is 002's classification report), and the confusion matrix as nested lists."""
    args = (y_true, y_pred, num_classes)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "precision_macro": precision(*args),
        "recall_macro": recall(*args),
        "f1_macro": f1(*args),
        "precision_weighted": precision(*args, average="weighted"),
        "weighted_f1": weighted_f1(*args),
        "specificity": specificity(*args),
        "cohen_kappa": cohen_kappa(*args),
        "per_class": {
            "precision": precision(*args, average=None).tolist(),
            "recall": recall(*args, average=None).tolist(),
            "f1": f1(*args, average=None).tolist(),
            "specificity": specificity(*args, average=None).tolist(),
            "support": confusion_matrix(*args).sum(1).tolist(),
        },
        "confusion_matrix": confusion_matrix(*args).tolist(),
    }


def regression_report(y_true, y_pred) -> dict:
    return {"mae": mae(y_true, y_pred), "rmse": rmse(y_true, y_pred), "pearson_r": pearson_r(y_true, y_pred),
            "acc2": acc2(y_true, y_pred), "acc7": acc7(y_true, y_pred)}


PAIRED_TESTS = ("t", "wilcoxon")


def paired_test(scores_a, scores_b, *, test: str = "t") -> dict:
    """Is method A's score different from method B's, over runs paired by seed?

    ``scores_a[i]`` and ``scores_b[i]`` are the two methods' scores (e.g. test accuracy) in
    run ``i`` (same seed, same data). ``test="t"``: the paired t-test on the differences
    d_i = a_i - b_i, t = mean(d) / (sd(d) / sqrt(n)) with n - 1 degrees of freedom
    (``scipy.stats.ttest_rel``); ``"wilcoxon"``: the signed-rank test (exact for small n,
    ``scipy.stats.wilcoxon``), which does not assume normal differences. Both two-sided.

    Returns {"test", "n", "mean_difference" (mean of a - b), "statistic", "p_value"}.
    Where every difference is 0 the two methods are indistinguishable on these runs and
    the p-value is 1 (SciPy's t-test gives NaN, 0 / 0). Where the differences are all
    equal but not 0, the t statistic is infinite and its p-value 0.
    """
    if test not in PAIRED_TESTS:
        raise ValueError(f"test must be one of {PAIRED_TESTS}, got {test!r}")
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"scores_a and scores_b need the same length, at least 2, got {a.size} and {b.size}")
    result = {"test": test, "n": int(a.size), "mean_difference": float((a - b).mean())}
    if np.all(a == b):
        return {**result, "statistic": 0.0, "p_value": 1.0}
    with warnings.catch_warnings():
        # equal non-zero differences: SciPy warns about the zero variance, the answer is right
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome = stats.ttest_rel(a, b) if test == "t" else stats.wilcoxon(a, b)
    return {**result, "statistic": float(outcome.statistic), "p_value": float(outcome.pvalue)}


def mcnemar(y_true, pred_a, pred_b, *, exact: bool = True) -> dict:
    """McNemar's test: do methods A and B make different numbers of errors on one test set?

    Only the discordant samples count: b = A right and B wrong, c = A wrong and B right.
    Under the null hypothesis each discordant sample is either kind with probability 1/2.
    ``exact``: the two-sided binomial test of b out of b + c at 1/2
    (``scipy.stats.binomtest``); otherwise the chi-squared statistic with continuity
    correction, max(|b - c| - 1, 0)^2 / (b + c), on 1 degree of freedom
    (``scipy.stats.chi2``). With no discordant sample the p-value is 1.

    Returns {"a_only_correct": b, "b_only_correct": c, "statistic", "p_value"}; the
    statistic is b for the exact test.
    """
    t = np.asarray(y_true).ravel()
    a, b = np.asarray(pred_a).ravel(), np.asarray(pred_b).ravel()
    if not t.size or t.shape != a.shape or t.shape != b.shape:
        raise ValueError(f"y_true, pred_a and pred_b need the same non-zero length, got {t.size}, {a.size}, {b.size}")
    a_right, b_right = a == t, b == t
    only_a, only_b = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    result = {"a_only_correct": only_a, "b_only_correct": only_b}
    discordant = only_a + only_b
    if discordant == 0:
        return {**result, "statistic": 0.0, "p_value": 1.0}
    if exact:
        return {**result, "statistic": float(only_a), "p_value": float(stats.binomtest(only_a, discordant, 0.5).pvalue)}
    statistic = max(abs(only_a - only_b) - 1, 0) ** 2 / discordant
    return {**result, "statistic": float(statistic), "p_value": float(stats.chi2.sf(statistic, 1))}


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
