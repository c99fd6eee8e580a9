"""models.metrics against hand-computed cases and scikit-learn."""

import math

import numpy as np
import pytest
import sklearn.metrics as skm

from models import metrics

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
    # binary case: specificity of class 1 is the recall of class 0
    t, p = [0, 0, 0, 1, 1], [0, 1, 0, 1, 0]
    assert metrics.specificity(t, p, average=None)[1] == pytest.approx(skm.recall_score(t, p, pos_label=0))


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    t = rng.integers(0, k, size=int(rng.integers(1, 200)))
    p = np.where(rng.random(t.size) < 0.6, t, rng.integers(0, k, size=t.size))
    labels = list(range(k))
    np.testing.assert_array_equal(metrics.confusion_matrix(t, p, k), skm.confusion_matrix(t, p, labels=labels))
    assert metrics.accuracy(t, p) == pytest.approx(skm.accuracy_score(t, p))
    expected_f1 = skm.f1_score(t, p, average="weighted", labels=labels, zero_division=0)
    assert metrics.weighted_f1(t, p, k) == pytest.approx(expected_f1)
    expected_kappa = skm.cohen_kappa_score(t, p)
    if math.isnan(expected_kappa):
        assert math.isnan(metrics.cohen_kappa(t, p, k))
    else:
        assert metrics.cohen_kappa(t, p, k) == pytest.approx(expected_kappa)


def test_f1_of_a_class_never_predicted_is_zero():
    # class 2 is never predicted: its F1 is 0 and it keeps its weight
    assert metrics.weighted_f1([0, 1, 2, 2], [0, 1, 0, 1]) == pytest.approx((2 / 3 + 2 / 3 + 0) / 4)


def test_regression_metrics_by_hand():
    t = [1.0, -2.0, 0.0, 2.5, -0.4]
    p = [0.5, -1.0, 1.0, 3.4, 0.6]
    assert metrics.mae(t, p) == pytest.approx((0.5 + 1.0 + 1.0 + 0.9 + 1.0) / 5)
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
