"""models.experiments.metrics (scikit-learn and SciPy underneath) against hand-computed cases and
independent numpy formulas."""

import math

import numpy as np
import pytest

from models.experiments import metrics

# 3 classes, 8 samples. Confusion (rows true, columns predicted):
#   [[2, 1, 0],
#    [0, 2, 1],
#    [1, 0, 1]]
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 0]


def test_confusion_matrix_by_hand():
    assert metrics.confusion_matrix(Y_TRUE, Y_PRED).tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    # num_classes adds the rows and columns of classes that never occur
    assert metrics.confusion_matrix([0, 1], [1, 1], num_classes=3).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_accuracy_f1_kappa_by_hand():
    assert metrics.accuracy(Y_TRUE, Y_PRED) == 5 / 8
    # per-class F1 = 2 TP / (predicted + actual): 4/6, 4/6, 2/4; weights 3, 3, 2
    assert metrics.weighted_f1(Y_TRUE, Y_PRED) == pytest.approx((3 * 4 / 6 + 3 * 4 / 6 + 2 * 2 / 4) / 8)
    # p_o = 5/8; p_e = (3*3 + 3*3 + 2*2) / 64 = 22/64
    assert metrics.cohen_kappa(Y_TRUE, Y_PRED) == pytest.approx((5 / 8 - 22 / 64) / (1 - 22 / 64))


def test_specificity_by_hand():
    # class 0: TN = 8 - 3 (actual 0) - 1 (FP) = 4 -> 4/5; class 1: FP 1, TN 4 -> 4/5; class 2: FP 1, TN 5 -> 5/6
    per_class = metrics.specificity(Y_TRUE, Y_PRED, average=None)
    np.testing.assert_allclose(per_class, [4 / 5, 4 / 5, 5 / 6])
    assert metrics.specificity(Y_TRUE, Y_PRED) == pytest.approx((4 / 5 + 4 / 5 + 5 / 6) / 3)
    # binary case: specificity of class 1 is the recall of class 0, 2 of the 3 true 0s
    t, p = [0, 0, 0, 1, 1], [0, 1, 0, 1, 0]
    assert metrics.specificity(t, p, average=None)[1] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="average"):
        metrics.specificity(t, p, average="weighted")


# Precision and recall differ here. Confusion [[1, 1, 0], [0, 2, 1], [0, 0, 1]]:
# TP 1, 2, 1; predicted 1, 3, 2; actual 2, 3, 1.
T_PR = [0, 0, 1, 1, 1, 2]
P_PR = [0, 1, 1, 1, 2, 2]


def test_precision_recall_f1_by_hand():
    np.testing.assert_allclose(metrics.precision(T_PR, P_PR, average=None), [1, 2 / 3, 1 / 2])
    np.testing.assert_allclose(metrics.recall(T_PR, P_PR, average=None), [1 / 2, 2 / 3, 1])
    # harmonic means: 2 * 1 * 1/2 / (3/2) = 2/3, 2/3, 2 * 1/2 * 1 / (3/2) = 2/3
    np.testing.assert_allclose(metrics.f1(T_PR, P_PR, average=None), [2 / 3, 2 / 3, 2 / 3])
    assert metrics.precision(T_PR, P_PR) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert metrics.recall(T_PR, P_PR) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # weighted by the true counts 2, 3, 1
    assert metrics.precision(T_PR, P_PR, average="weighted") == pytest.approx((2 * 1 + 3 * 2 / 3 + 1 / 2) / 6)
    assert metrics.recall(T_PR, P_PR, average="weighted") == pytest.approx(metrics.accuracy(T_PR, P_PR))
    # a class that never occurs (num_classes=4) scores 0 and drags the macro mean down
    np.testing.assert_allclose(metrics.precision(T_PR, P_PR, 4, average=None), [1, 2 / 3, 1 / 2, 0])
    assert metrics.f1(T_PR, P_PR, 4) == pytest.approx(3 * (2 / 3) / 4)
    with pytest.raises(ValueError, match="average"):
        metrics.recall(T_PR, P_PR, average="micro")


def test_classification_report_has_the_per_class_table():
    report = metrics.classification_report(T_PR, P_PR, 3)
    assert report["per_class"]["support"] == [2, 3, 1]
    np.testing.assert_allclose(report["per_class"]["recall"], [1 / 2, 2 / 3, 1])
    # specificity of class 0: 4 true non-0s, none predicted 0 -> 1; class 1: 1 of 3 -> 2/3; class 2: 1 of 5 -> 4/5
    np.testing.assert_allclose(report["per_class"]["specificity"], [1, 2 / 3, 4 / 5])
    assert report["precision_macro"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert report["f1_macro"] == pytest.approx(2 / 3)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert set(report) >= {"accuracy", "recall_macro", "precision_weighted", "weighted_f1", "specificity", "cohen_kappa"}


def _independent(t: np.ndarray, p: np.ndarray, k: int) -> dict:
    """The classification metrics from a confusion matrix counted with numpy."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp, predicted, actual, n = np.diag(cm).astype(float), cm.sum(0), cm.sum(1), cm.sum()

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros(k), where=b > 0)

    prec, rec = ratio(tp, predicted), ratio(tp, actual)
    f1 = ratio(2 * tp, predicted + actual)
    fp = predicted - tp
    tn = n - actual - fp
    p_o, p_e = tp.sum() / n, (predicted * actual).sum() / n**2
    return {
        "cm": cm, "accuracy": p_o, "precision": prec, "recall": rec, "f1": f1,
        "weighted_f1": (f1 * actual).sum() / n, "specificity": ratio(tn, tn + fp),
        "kappa": (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan,
    }


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_independent_formulas(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    t = rng.integers(0, k, size=int(rng.integers(1, 200)))
    p = np.where(rng.random(t.size) < 0.6, t, rng.integers(0, k, size=t.size))
    expected = _independent(t, p, k)
    np.testing.assert_array_equal(metrics.confusion_matrix(t, p, k), expected["cm"])
    assert metrics.accuracy(t, p) == pytest.approx(expected["accuracy"])
    for name in ("precision", "recall", "f1", "specificity"):
        np.testing.assert_allclose(getattr(metrics, name)(t, p, k, average=None), expected[name], err_msg=name)
        assert getattr(metrics, name)(t, p, k) == pytest.approx(expected[name].mean()), name
    assert metrics.weighted_f1(t, p, k) == pytest.approx(expected["weighted_f1"])
    if math.isnan(expected["kappa"]):
        assert math.isnan(metrics.cohen_kappa(t, p, k))
    else:
        assert metrics.cohen_kappa(t, p, k) == pytest.approx(expected["kappa"])


def test_kappa_is_nan_when_chance_agreement_is_certain():
    assert math.isnan(metrics.cohen_kappa([1, 1, 1], [1, 1, 1], 3))
    # one class throughout on one side only: p_o = p_e = 1/3, kappa = 0
    assert metrics.cohen_kappa([1, 1, 1], [0, 1, 2], 3) == pytest.approx(0.0)


def test_f1_of_a_class_never_predicted_is_zero():
    # class 2 is never predicted: its F1 is 0 and it keeps its weight
    assert metrics.weighted_f1([0, 1, 2, 2], [0, 1, 0, 1]) == pytest.approx((2 / 3 + 2 / 3 + 0) / 4)


def test_regression_metrics_by_hand():
    t = [1.0, -2.0, 0.0, 2.5, -0.4]
    p = [0.5, -1.0, 1.0, 3.4, 0.6]
    assert metrics.mae(t, p) == pytest.approx((0.5 + 1.0 + 1.0 + 0.9 + 1.0) / 5)
    assert metrics.rmse(t, p) == pytest.approx(math.sqrt((0.25 + 1.0 + 1.0 + 0.81 + 1.0) / 5))
    assert metrics.rmse([2.0], [-1.0]) == pytest.approx(3.0)
    # Acc-2 leaves out the true 0: signs agree for 1, -2, 2.5, not for -0.4 -> 3/4
    assert metrics.acc2(t, p) == 3 / 4
    # without exclusion 0 is negative and the prediction 1.0 positive -> 3/5
    assert metrics.acc2(t, p, exclude_zero=False) == 3 / 5
    # Acc-7: round(clip): t -> 1, -2, 0, 2 (2.5 rounds to even), -0; p -> 0 (0.5 to even), -1, 1, 3, 1
    assert metrics.acc7(t, p) == 0.0
    assert metrics.acc7([3.7, -3.2, 1.4], [2.6, -9.0, 0.6]) == 1.0


def test_pearson_r_by_hand():
    assert metrics.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (-1, 0, 1), y centred = (-1/3, -1/3, 2/3): r = 1 / sqrt(2 * 2/3)
    assert metrics.pearson_r([1, 2, 3], [0, 0, 1]) == pytest.approx(1 / math.sqrt(4 / 3))
    assert math.isnan(metrics.pearson_r([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    assert metrics.pearson_r(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_regression_report_keys():
    report = metrics.regression_report([1.0, -2.0, 0.5], [0.5, -1.0, 1.0])
    assert set(report) == {"mae", "rmse", "pearson_r", "acc2", "acc7"}


def test_paired_t_test_by_hand():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3 on 2 degrees of
    # freedom, whose two-sided tail is 1 - |t| / sqrt(2 + t^2)
    result = metrics.paired_test([0.9, 0.8, 0.7], [0.8, 0.6, 0.4])
    t = 2 * math.sqrt(3)
    assert result["n"] == 3 and result["mean_difference"] == pytest.approx(0.2)
    assert result["statistic"] == pytest.approx(t)
    assert result["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # swapping the methods flips the sign, not the p-value
    swapped = metrics.paired_test([0.8, 0.6, 0.4], [0.9, 0.8, 0.7])
    assert swapped["statistic"] == pytest.approx(-t) and swapped["p_value"] == pytest.approx(result["p_value"])


def test_wilcoxon_by_hand():
    # differences 1, -2, 3, 4, 5: W- = 2 (the rank of |-2|); under the null each of the 2^5 sign
    # patterns is equally likely and 3 of them ({}, {1}, {2}) give a sum <= 2: p = 2 * 3 / 32
    result = metrics.paired_test([1, 0, 3, 4, 5], [0, 2, 0, 0, 0], test="wilcoxon")
    assert result["statistic"] == 2 and result["p_value"] == pytest.approx(6 / 32)
    # all five one way: p = 2 / 32
    assert metrics.paired_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0], test="wilcoxon")["p_value"] == pytest.approx(2 / 32)


def test_paired_test_edge_cases():
    for test in metrics.PAIRED_TESTS:
        same = metrics.paired_test([0.5, 0.7, 0.9], [0.5, 0.7, 0.9], test=test)
        assert same["p_value"] == 1.0 and same["mean_difference"] == 0.0
    constant_shift = metrics.paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert constant_shift["p_value"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="scores_a and scores_b"):
        metrics.paired_test([0.5], [0.4])
    with pytest.raises(ValueError, match="scores_a and scores_b"):
        metrics.paired_test([0.5, 0.6], [0.4, 0.5, 0.6])
    with pytest.raises(ValueError, match="test must be"):
        metrics.paired_test([0.5, 0.6], [0.4, 0.5], test="anova")


def test_mcnemar_by_hand():
    # 12 samples of class 0: A alone right on 8, B alone right on 2, both right on 2
    y = [0] * 12
    a = [0] * 8 + [1] * 2 + [0] * 2
    b = [1] * 8 + [0] * 2 + [0] * 2
    exact = metrics.mcnemar(y, a, b)
    assert (exact["a_only_correct"], exact["b_only_correct"]) == (8, 2)
    # two-sided binomial: 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert exact["p_value"] == pytest.approx(112 / 1024)
    # chi-squared with continuity: (|8 - 2| - 1)^2 / 10 = 2.5; on 1 dof P(Z^2 > x) = erfc(sqrt(x / 2))
    approx = metrics.mcnemar(y, a, b, exact=False)
    assert approx["statistic"] == pytest.approx(2.5)
    assert approx["p_value"] == pytest.approx(math.erfc(math.sqrt(1.25)))
    assert metrics.mcnemar(y, b, a)["p_value"] == pytest.approx(exact["p_value"])
    # no discordant sample: nothing tells the methods apart
    assert metrics.mcnemar([0, 1, 2], [0, 1, 0], [0, 1, 0])["p_value"] == 1.0
    with pytest.raises(ValueError, match="pred_a"):
        metrics.mcnemar([0, 1], [0, 1], [0])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="same non-zero length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="nothing to count"):
        metrics.acc2([0.0, 0.0], [1.0, -1.0])


def test_confusion_plot_is_written(tmp_path):
    path = tmp_path / "cm.png"
    metrics.plot_confusion_matrix(metrics.confusion_matrix(Y_TRUE, Y_PRED), ["a", "b", "c"], str(path), title="t")
    assert path.stat().st_size > 1000
