"""GLUE metrics against hand-computed values and scipy."""

import math

import numpy as np
import pytest
import scipy.stats

from adapad_jax.metrics import compute_metrics
from adapad_jax.metrics.glue import accuracy, f1_binary, matthews_correlation, pearson, spearman


def test_accuracy_and_f1_hand_computed():
    predictions, references = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
    assert accuracy(predictions, references) == pytest.approx(4 / 5)
    # TP=2, FP=1, FN=0: precision 2/3, recall 1.
    assert f1_binary(predictions, references) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1_binary([0, 0, 0], [1, 0, 1]) == 0.0


def test_matthews_binary_hand_computed():
    # TP=2, TN=2, FP=1, FN=0 -> (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 4 / 6
    assert matthews_correlation([1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx(4 / 6)
    assert matthews_correlation([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_correlation([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)


def test_matthews_all_same_prediction_is_zero():
    assert matthews_correlation([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    assert matthews_correlation([0, 0, 0], [0, 0, 0]) == 0.0


def test_matthews_multiclass_hand_computed():
    # confusion (true x pred): [[1,0,0],[0,1,1],[1,0,0]]; c=2, s=4, t=(1,2,1), p=(2,1,1)
    # (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (8 - 5) / sqrt(10 * 10)
    assert matthews_correlation([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)


def test_pearson_hand_computed_and_constant():
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): sum dx dy = 3, sum dx^2 = 2, sum dy^2 = 14/3
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 14 / 3))
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_spearman_with_ties_hand_computed():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0


def test_correlations_agree_with_scipy_on_random_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    y_tied = np.round(y)  # many ties
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert spearman(x, y_tied) == pytest.approx(scipy.stats.spearmanr(x, y_tied)[0])


def test_compute_metrics_per_task_keys():
    assert set(compute_metrics("glue_cola", [1, 0], [1, 0])) == {"matthews_correlation"}
    assert compute_metrics("glue_mrpc", [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx({"accuracy": 0.8, "f1": 0.8})
    stsb = compute_metrics("glue_stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert set(stsb) == {"pearson", "spearmanr"} and stsb["spearmanr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal-length"):
        compute_metrics("glue_sst2", [1, 0], [1])
