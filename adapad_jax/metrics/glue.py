"""GLUE metrics: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.

Values are fractions (GLUE papers print them x100). A correlation that is undefined because one side is
constant (including Matthews with all-same predictions) is reported as 0.0, as scikit-learn does for MCC.
"""

from __future__ import annotations

import numpy as np
import scipy.stats


def _pair(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"predictions {p.shape} and references {r.shape} must be equal-length non-empty vectors")
    return p, r


def accuracy(predictions, references) -> float:
    """Fraction of exact matches."""
    p, r = _pair(predictions, references)
    return float(np.mean(p == r))


def f1_binary(predictions, references, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there are no true positives."""
    p, r = _pair(predictions, references)
    true_positive = np.sum((p == positive) & (r == positive))
    if true_positive == 0:
        return 0.0
    precision = true_positive / np.sum(p == positive)
    recall = true_positive / np.sum(r == positive)
    return float(2 * precision * recall / (precision + recall))


def matthews_correlation(predictions, references) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004, as in scikit-learn)."""
    p, r = _pair(predictions, references)
    classes, codes = np.unique(np.concatenate([r, p]), return_inverse=True)
    n = len(r)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    true_per_class = confusion.sum(axis=1)
    predicted_per_class = confusion.sum(axis=0)
    correct = np.trace(confusion)
    numerator = correct * n - true_per_class @ predicted_per_class
    predicted_spread = n * n - predicted_per_class @ predicted_per_class
    true_spread = n * n - true_per_class @ true_per_class
    denominator = np.sqrt(predicted_spread * true_spread)
    return 0.0 if denominator == 0 else float(numerator / denominator)


def pearson(predictions, references) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    p, r = _pair(predictions, references)
    p, r = p.astype(np.float64), r.astype(np.float64)
    p, r = p - p.mean(), r - r.mean()
    denominator = np.sqrt(np.sum(p * p) * np.sum(r * r))
    return 0.0 if denominator == 0 else float(np.sum(p * r) / denominator)


def spearman(predictions, references) -> float:
    """Spearman rank correlation with average ranks for ties; 0.0 when either side is constant."""
    p, r = _pair(predictions, references)
    return pearson(scipy.stats.rankdata(p), scipy.stats.rankdata(r))


METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}
