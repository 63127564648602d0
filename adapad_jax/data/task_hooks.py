"""Tasks that bring their own task spec, preparation and report (the offline demo, your own data), found by
``config.task``.

A run asks ``hooks_for(config.task)``: for GLUE / SQuAD it is None and the data pipeline's own task specs apply;
a registered task's module exposes ``TASK_HOOKS`` and is imported only when that task runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# task name -> module that defines TASK_HOOKS
REGISTERED = {"demo": "adapad_jax.studies.demo", "custom": "adapad_jax.data.custom"}


@dataclasses.dataclass(frozen=True)
class TaskHooks:
    """What a registered task adds to a run: its spec, a step before validation, and a report after the run."""

    task_spec: Any  # adapad_jax.data.tasks.TaskSpec, or (config) -> TaskSpec when the spec depends on data.*
    prepare_config: Callable[..., Any]  # (config, log) -> None: build assets, fill in paths, before validation
    report: Callable[..., Any]  # (config, RunResult) -> None: printed after the run


def hooks_for(task: str) -> TaskHooks | None:
    """The hooks of a registered task, or None for the GLUE / SQuAD tasks."""
    module = REGISTERED.get(task)
    return None if module is None else importlib.import_module(module).TASK_HOOKS
