"""Per-task metrics, and model outputs over an eval set -> predictions and predictions.jsonl rows."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from adapad_jax.data.pipeline import EvalSet, TaskData
from adapad_jax.data.tasks import TaskSpec, get_task
from adapad_jax.metrics.glue import METRIC_FUNCTIONS
from adapad_jax.metrics.qa_postprocess import postprocess_qa_predictions
from adapad_jax.metrics.squad import squad_v1_metrics, squad_v2_metrics


def _spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def compute_metrics(
    task: str | TaskSpec,
    predictions: Any,
    references: Any,
    no_answer_probability: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Flat dict of the task's metrics.

    GLUE: ``predictions`` / ``references`` are equal-length sequences of class ids (or floats for STS-B).
    SQuAD: ``predictions`` maps id -> answer text, ``references`` maps id -> answers ({"text": [...]} or a
    list of texts); v2 optionally takes ``no_answer_probability`` for the best-threshold figures.
    """
    spec = _spec(task)
    if spec.kind == "qa":
        if spec.version_2:
            return squad_v2_metrics(predictions, references, no_answer_probability)
        return squad_v1_metrics(predictions, references)
    return {name: METRIC_FUNCTIONS[name](predictions, references) for name in spec.metric_names}


def metric_key(spec: TaskSpec, split: str, name: str) -> str:
    """Key of a metric in the flat results: the bare name, or ``split/name`` for tasks with several splits."""
    return name if len(spec.validation_splits) == 1 else f"{split}/{name}"


def main_metric_key(task: str | TaskSpec) -> str:
    """The headline metric's key in ``evaluate_task`` results (first validation split)."""
    spec = _spec(task)
    return metric_key(spec, spec.validation_splits[0], spec.main_metric)


# Every metric the tasks report (accuracy, F1, MCC, correlations, EM) is better when higher; a metric that is
# better when lower (a loss, an error rate) belongs here.
LOWER_IS_BETTER: frozenset[str] = frozenset()


def main_metric(task: str | TaskSpec) -> tuple[str, str]:
    """The task's headline metric as (key in ``evaluate_task`` results, ``"max"`` or ``"min"``): what ranks
    checkpoints for ``train.select_best``."""
    spec = _spec(task)
    return main_metric_key(spec), "min" if spec.main_metric in LOWER_IS_BETTER else "max"


def predictions_from_outputs(
    spec: TaskSpec,
    eval_set: EvalSet,
    outputs: Mapping[str, np.ndarray],
    *,
    null_threshold: float = 0.0,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Outputs of the model on every row of ``eval_set.features`` (padding removed) -> (predictions, references, rows).

    Classification/regression: ``outputs["logits"]`` [N, C] ([N, 1] or [N] for regression).
    QA: ``outputs["start_logits"]``, ``outputs["end_logits"]`` [N windows, S].
    ``rows`` are the predictions.jsonl rows: ``idx, label, logits`` or ``id, prediction_text``
    (+ ``no_answer_probability`` for v2); tasks with several validation splits add ``split``.
    ``predictions``: class ids / scores [N] (GLUE), or for QA a pair (id -> text, id -> no-answer
    probability, None for v1); ``references``: labels [N], or id -> answers.
    """
    extra = {"split": eval_set.split} if len(spec.validation_splits) > 1 else {}
    if spec.kind == "qa":
        qa = eval_set.qa
        result = postprocess_qa_predictions(
            [str(i) for i in eval_set.examples["id"]],
            eval_set.examples["context"],
            qa.example_index,
            qa.offset_mapping,
            outputs["start_logits"],
            outputs["end_logits"],
            version_2=spec.version_2,
            n_best=n_best,
            max_answer_length=max_answer_length,
            null_threshold=null_threshold,
        )
        references = {str(i): a for i, a in zip(eval_set.examples["id"], eval_set.examples["answers"])}
        rows = []
        for qid, text in result.text.items():
            row = {"id": qid, "prediction_text": text, **extra}
            if spec.version_2:
                row["no_answer_probability"] = result.no_answer_probability[qid]
            rows.append(row)
        predictions = (result.text, result.no_answer_probability if spec.version_2 else None)
        return predictions, references, rows

    logits = np.asarray(outputs["logits"], dtype=np.float64)
    count = eval_set.num_features
    if len(logits) != count:
        raise ValueError(f"{len(logits)} rows of logits for {count} examples of split {eval_set.split}")
    logits2d = logits.reshape(count, -1)
    if spec.kind == "regression":
        predicted = logits2d[:, 0]
    else:
        predicted = logits2d.argmax(axis=-1)
    rows = [
        {"idx": int(i), "label": (float(p) if spec.kind == "regression" else int(p)), "logits": l.tolist(), **extra}
        for i, p, l in zip(eval_set.features["idx"], predicted, logits2d)
    ]
    return predicted, eval_set.features["labels"], rows


def evaluate_split(
    spec: TaskSpec, eval_set: EvalSet, outputs: Mapping[str, np.ndarray], **postprocess_kwargs
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (keys prefixed for multi-split tasks) and predictions.jsonl rows of one split."""
    predictions, references, rows = predictions_from_outputs(spec, eval_set, outputs, **postprocess_kwargs)
    if spec.kind == "qa":
        texts, no_answer = predictions
        metrics = compute_metrics(spec, texts, references, no_answer)
    else:
        metrics = compute_metrics(spec, predictions, references)
    return {metric_key(spec, eval_set.split, k): v for k, v in metrics.items()}, rows


def evaluate_task(
    data: TaskData, outputs_per_split: Mapping[str, Mapping[str, np.ndarray]], **postprocess_kwargs
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All splits of ``data.evals`` at once: one flat metrics dict and all predictions.jsonl rows."""
    metrics, rows = {}, []
    for split, eval_set in data.evals.items():
        split_metrics, split_rows = evaluate_split(data.spec, eval_set, outputs_per_split[split], **postprocess_kwargs)
        metrics.update(split_metrics)
        rows.extend(split_rows)
    return metrics, rows
