"""GLUE metrics, SQuAD EM/F1 (v1.1, v2.0), QA post-processing, and the per-task evaluation entry points."""

from adapad_jax.metrics.evaluate import (
    compute_metrics,
    evaluate_split,
    evaluate_task,
    main_metric,
    main_metric_key,
    metric_key,
    predictions_from_outputs,
)
from adapad_jax.metrics.glue import accuracy, f1_binary, matthews_correlation, pearson, spearman
from adapad_jax.metrics.qa_postprocess import QAPredictions, postprocess_qa_predictions
from adapad_jax.metrics.squad import normalize_answer, squad_v1_metrics, squad_v2_metrics

__all__ = [
    "QAPredictions",
    "accuracy",
    "compute_metrics",
    "evaluate_split",
    "evaluate_task",
    "f1_binary",
    "main_metric",
    "main_metric_key",
    "matthews_correlation",
    "metric_key",
    "normalize_answer",
    "pearson",
    "postprocess_qa_predictions",
    "predictions_from_outputs",
    "spearman",
    "squad_v1_metrics",
    "squad_v2_metrics",
]
