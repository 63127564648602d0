"""task=custom: sentence or sentence-pair classification / regression on your own data, described by data.*.

``data.text_columns`` (one or two), ``data.label_column``, and optionally ``data.label_names``,
``data.problem_type`` and ``data.metric`` (see adapad_jax/config/schema.py). Before validation, ``prepare_config``
fills in what was left to the data: the problem type (regression when every training label is a number and
some are not whole) and the class names (a hub ClassLabel's names, else the training labels sorted, numbers
numerically). The run's config.json keeps them, so export and prediction need no data.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import ml_collections

from adapad_jax.data.loading import _load_hub, label_key, read_file_rows, split_validation_files
from adapad_jax.data.tasks import DataError, TaskSpec
from adapad_jax.data.task_hooks import TaskHooks

CUSTOM_TASK = "custom"
_METRICS = {
    "accuracy": ("accuracy",),
    "f1": ("f1", "accuracy"),
    "matthews_correlation": ("matthews_correlation", "accuracy"),
    "pearson": ("pearson", "spearmanr"),
}


def _metric_names(metric: str, kind: str, num_labels: int) -> tuple[str, ...]:
    if metric == "auto":
        if kind == "regression":
            return _METRICS["pearson"]
        return ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    if (metric == "pearson") != (kind == "regression"):
        raise DataError(f"data.metric={metric} does not fit a {kind} task: pearson is for regression, accuracy / "
                        "f1 / matthews_correlation for classification")
    if metric == "f1" and num_labels != 2:
        raise DataError(f"data.metric=f1 is the F1 of class 1 of two classes; this task has {num_labels}")
    return _METRICS[metric]


def _hub_names(data: ml_collections.ConfigDict) -> tuple[tuple[str, str | None], ...]:
    return ((data.dataset_name, data.dataset_config or None),) if data.dataset_name else ()


def _spec(data: ml_collections.ConfigDict, kind: str, label_names: Sequence[str]) -> TaskSpec:
    names = tuple(label_names) if kind == "classification" else ()
    num_labels = 1 if kind == "regression" else len(names)
    return TaskSpec(
        name=CUSTOM_TASK, kind=kind, hub_names=_hub_names(data), text_columns=tuple(data.text_columns),
        num_labels=num_labels, metric_names=_metric_names(data.metric, kind, num_labels),
        label_column=data.label_column, label_names=names,
    )


def _reading_spec(data: ml_collections.ConfigDict) -> TaskSpec:
    """A spec to find and read the data with before the classes are known (no labels, no metrics)."""
    return TaskSpec(name=CUSTOM_TASK, kind="classification", hub_names=_hub_names(data),
                    text_columns=tuple(data.text_columns), num_labels=0, metric_names=(),
                    label_column=data.label_column)


def custom_task_spec(config: ml_collections.ConfigDict) -> TaskSpec:
    """The TaskSpec of a task=custom config whose problem type and class names are known (``prepare_config``)."""
    data = config.data
    kind = data.problem_type
    if kind == "auto" or (kind == "classification" and not data.label_names):
        raise DataError("task=custom: the labels are not known yet (data.problem_type / data.label_names); "
                        "prepare_config (adapad_jax/data/custom.py) fills them in from the training data, "
                        "which adapad_jax.run.core.run calls first")
    return _spec(data, kind, data.label_names)


def _require_columns(origin: str, present: Sequence[str], data: ml_collections.ConfigDict) -> None:
    """The data has every column data.text_columns and data.label_column name, or one line listing what it has."""
    missing = [c for c in (*data.text_columns, data.label_column) if c not in present]
    if missing:
        raise DataError(f"{origin} lacks column(s) {', '.join(missing)} named by data.text_columns / "
                        f"data.label_column (its columns: {', '.join(present) or 'none'})")


def _label_source(data: ml_collections.ConfigDict) -> tuple[list[Any], tuple[str, ...]]:
    """The labels to learn the classes from (training data, else the first validation file) and ClassLabel names."""
    column = data.label_column
    if data.dataset_name:
        dataset = _load_hub(_reading_spec(data), "train")
        _require_columns(f"hub dataset {data.dataset_name}", dataset.column_names, data)
        return list(dataset[column]), tuple(getattr(dataset.features[column], "names", None) or ())
    path = data.train_file or next(iter(split_validation_files(_reading_spec(data), data.validation_file).values()))
    rows = read_file_rows(path)
    if not rows or not isinstance(rows[0], dict):
        raise DataError(f"data file '{path}' has no rows with named columns")
    _require_columns(f"data file '{path}'", list(rows[0]), data)
    return [row.get(column) for row in rows], ()


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def infer_problem_type(labels: Sequence[Any], class_names: Sequence[str] = ()) -> str:
    """regression when every label is a number and some are not whole (no ClassLabel), else classification."""
    if class_names or not labels or not all(_is_number(v) for v in labels):
        return "classification"
    return "regression" if any(not float(v).is_integer() for v in labels) else "classification"


def label_names_from(labels: Sequence[Any]) -> tuple[str, ...]:
    """Class names from the training labels: sorted, numerically when every label is a whole number."""
    missing = next((i for i, v in enumerate(labels, start=1) if v is None or label_key(v) == ""), None)
    if missing is not None:
        raise DataError(f"row {missing} of the training data has no label (data.label_column)")
    keys = {label_key(v) for v in labels}
    if all(k.lstrip("-").isdigit() for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))


def prepare_config(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> None:
    """Fill ``data.problem_type`` and (classification) ``data.label_names`` from the data when left to it."""
    data = config.data
    if data.problem_type == "regression" or (data.problem_type == "classification" and data.label_names):
        return
    labels, class_names = _label_source(data)
    kind = data.problem_type if data.problem_type != "auto" else infer_problem_type(labels, class_names)
    if kind == "classification" and not data.label_names:
        names = tuple(class_names) or label_names_from(labels)
        if len(names) < 2:
            raise DataError(f"the training labels have {len(names)} class(es) {list(names)}: classification "
                            "needs at least two (or set data.problem_type=regression)")
        data.label_names = names
    data.problem_type = kind
    _metric_names(data.metric, kind, len(data.label_names))  # a metric that does not fit fails here, not later
    described = f"{len(data.label_names)} classes: {', '.join(data.label_names)}" if kind == "classification" else (
        "one score")
    log(f"task custom: {kind} of {' + '.join(data.text_columns)} -> {data.label_column} ({described})")


def _no_report(config: Any, result: Any) -> None:
    """task=custom prints nothing beyond the run's own lines."""


TASK_HOOKS = TaskHooks(task_spec=custom_task_spec, prepare_config=prepare_config, report=_no_report)
