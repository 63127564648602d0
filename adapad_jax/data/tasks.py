"""Task registry: GLUE and SQuAD schemas, label counts, metrics and split names."""

from __future__ import annotations

import dataclasses
from typing import Literal

TaskKind = Literal["classification", "regression", "qa"]


class DataError(ValueError):
    """A dataset, data file or task name that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the pipelines need to know about one task."""

    name: str  # registry name, e.g. "glue_mnli" or "squad_v2"
    kind: TaskKind
    hub_names: tuple[tuple[str, str | None], ...]  # (path, config name) tried in order with datasets.load_dataset
    text_columns: tuple[str, ...]  # one column (single sentence) or two (a pair, in model input order)
    num_labels: int  # 1 for regression, 2 for span QA (start/end), else the class count
    metric_names: tuple[str, ...]  # keys of compute_metrics' result, the first is the task's main metric
    validation_splits: tuple[str, ...] = ("validation",)
    train_split: str = "train"
    label_column: str | None = "label"
    id_column: str = "idx"
    version_2: bool = False  # SQuAD v2: unanswerable questions exist
    label_names: tuple[str, ...] = ()  # class names by label id (data files may give labels by name)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Columns a data file of this task must have (the id column is filled with row numbers when absent)."""
        if self.kind == "qa":
            return ("id", "context", "question", "answers")
        return self.text_columns + ((self.label_column,) if self.label_column else ())

    @property
    def main_metric(self) -> str:
        """The metric the paper reports first for this task."""
        return self.metric_names[0]

    @property
    def is_glue(self) -> bool:
        """True for the GLUE tasks."""
        return self.name.startswith("glue_")


def _glue(config: str, columns: tuple[str, ...], num_labels: int, metrics: tuple[str, ...], **kw) -> TaskSpec:
    return TaskSpec(
        name=f"glue_{config}",
        kind="regression" if num_labels == 1 else "classification",
        hub_names=(("nyu-mll/glue", config), ("glue", config)),
        text_columns=columns,
        num_labels=num_labels,
        metric_names=metrics,
        **kw,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("cola", ("sentence",), 2, ("matthews_correlation",), label_names=("unacceptable", "acceptable")),
        _glue("sst2", ("sentence",), 2, ("accuracy",), label_names=("negative", "positive")),
        _glue("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), label_names=("not_equivalent", "equivalent")),
        _glue("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), label_names=("not_duplicate", "duplicate")),
        _glue("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("accuracy",),
            validation_splits=("validation_matched", "validation_mismatched"),
            label_names=("entailment", "neutral", "contradiction"),
        ),
        _glue("qnli", ("question", "sentence"), 2, ("accuracy",), label_names=("entailment", "not_entailment")),
        _glue("rte", ("sentence1", "sentence2"), 2, ("accuracy",), label_names=("entailment", "not_entailment")),
        TaskSpec(
            name="squad",
            kind="qa",
            hub_names=(("rajpurkar/squad", None), ("squad", None)),
            text_columns=("question", "context"),
            num_labels=2,
            metric_names=("f1", "exact_match"),
            label_column=None,
            id_column="id",
        ),
        TaskSpec(
            name="squad_v2",
            kind="qa",
            hub_names=(("rajpurkar/squad_v2", None), ("squad_v2", None)),
            text_columns=("question", "context"),
            num_labels=2,
            metric_names=("f1", "exact", "HasAns_f1", "NoAns_f1"),
            label_column=None,
            id_column="id",
            version_2=True,
        ),
    )
}

# Short names users may type ("mnli", "squad2", ...).
_ALIASES = {name.removeprefix("glue_"): name for name in TASKS if name.startswith("glue_")}
_ALIASES.update({"squad_v1": "squad", "squad1": "squad", "squad2": "squad_v2", "squadv2": "squad_v2"})


def get_task(name: str) -> TaskSpec:
    """Look up a task by registry name ("glue_cola", "squad_v2") or short alias ("cola", "mnli")."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[key]
