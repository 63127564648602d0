"""The up-front checks of a run that need more than the config: the model checkpoint and the saved run.

``validate_config`` runs every check of a run config before any compute and before the output directory is
touched: the field rules (``config/validation.check_fields``, pure, in the config layer), the mesh against the
devices, the model checkpoint (its ``config.json`` only, to count the adapted modules) and the budget against
that count, and the local data files. ``check_resume`` compares a config with the one a saved run was trained
with. Every problem is one ``ConfigError`` naming the field and the fix; docs/ARCHITECTURE.md lists each rule's
owner. Imports of the models package are function-local: a bad field is reported before it loads.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import ml_collections

from adapad_jax.config.schema import ConfigError, base_config
from adapad_jax.config.validation import (
    LOCAL_PATH_FIELDS, RESUME_CHANGEABLE_FIELDS, RESUME_LENGTH_FIELDS, _require_range, _require_type, budget_field,
    budget_from_params, check_fields, check_mesh, check_rank_budget, has_slot_axis, task_spec_for,
)
from adapad_jax.run.resume_identity import normalise_model_path


@dataclasses.dataclass
class CheckedRun:
    """What validation learned on the way: the task spec, the checkpoint's config and the module count."""

    task_spec: Any  # adapad_jax.data.tasks.TaskSpec
    checkpoint_dir: Any  # pathlib.Path
    hf_config: Any  # transformers.PretrainedConfig
    num_modules: int
    resume_changes: dict = dataclasses.field(default_factory=dict)  # {field: (old, new)} allowed on this resume


def validate_config(
    config: ml_collections.ConfigDict, *, num_devices: int | None = None, platform: str = ""
) -> CheckedRun:
    """Every up-front check, in order: fields, mesh, model checkpoint and budget, data files."""
    from adapad_jax.data.loading import validate_data_files
    from adapad_jax.data.tasks import DataError

    check_fields(config)
    if num_devices is not None:
        check_mesh(config, num_devices, platform)
    task_spec = task_spec_for(config)
    checkpoint_dir, hf_config, num_modules = check_model(config, task_spec.kind)
    if config.data.source == "hub" and (config.data.train_file or config.data.validation_file):
        raise ConfigError(
            f"data.source={config.data.source} cannot be combined with data.train_file / data.validation_file"
        )
    if config.data.source == "local" and not (config.data.train_file or config.data.validation_file):
        raise ConfigError("data.source=local needs data.train_file and/or data.validation_file")
    if config.train.num_steps != 0 and config.data.validation_file and not config.data.train_file:
        raise ConfigError("data.validation_file is given without data.train_file: give both (or num_steps=0)")
    try:
        validate_data_files(task_spec, config.data.train_file, config.data.validation_file)
    except DataError as err:
        raise ConfigError(str(err)) from None
    return CheckedRun(task_spec, checkpoint_dir, hf_config, num_modules)


def count_adapter_targets(hf_config: Any, task_kind: str, target_modules: Sequence[str]) -> int:
    """How many modules a model built from ``hf_config`` adapts (reads the config only, builds nothing)."""
    return len(target_widths(hf_config, task_kind, target_modules))


def check_model(config: ml_collections.ConfigDict, task_kind: str) -> tuple[Any, Any, int]:
    """Find the checkpoint, read its config.json and check the budget against the module count."""
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import load_hf_config

    try:
        checkpoint_dir, hf_config = load_hf_config(config.model.name_or_path, revision=config.model.revision or None)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    widths = target_widths(hf_config, task_kind, config.adapter.target_modules)
    num_modules = len(widths)
    adapter = config.adapter
    rank_budget = adapter.rank_budget
    if adapter.param_budget > 0:
        converted = budget_from_params(adapter.param_budget, widths, adapter.method, adapter.initial_rank)
        rank_budget = converted if has_slot_axis(adapter.method) else rank_budget
    if has_slot_axis(adapter.method) and adapter.grow:
        check_rank_budget(rank_budget, num_modules, adapter.initial_rank, config.model.name_or_path)
    return checkpoint_dir, hf_config, num_modules


def target_widths(hf_config: Any, task_kind: str, target_modules: Sequence[str]) -> list[int]:
    """in + out of each module a model built from ``hf_config`` adapts (reads the config only)."""
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import targets_for_config

    try:
        targets = targets_for_config(hf_config, task_kind, tuple(target_modules) or None)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        raise ConfigError(f"adapter.target_modules: {err}") from None
    return [t.in_features + t.out_features for t in targets]


def adapter_target_widths(config: ml_collections.ConfigDict) -> list[int]:
    """``target_widths`` of the config's model and task (reads the checkpoint's config.json)."""
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import load_hf_config

    try:
        _, hf_config = load_hf_config(config.model.name_or_path, revision=config.model.revision or None)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    return target_widths(hf_config, task_spec_for(config).kind, config.adapter.target_modules)


def check_budget_overrides(config: ml_collections.ConfigDict, overridden: Sequence[str]) -> None:
    """With ``adapter.param_budget`` > 0, a rank budget also given on the command line must be its conversion
    (``budget_from_params``): one of the two would be silently dropped."""
    param_budget = _require_range(config, "adapter.param_budget", (int,), 0)
    field = budget_field(_require_type(config, "adapter.method", (str,)))
    if not param_budget or f"adapter.{field}" not in overridden:
        return
    given = config.adapter[field]
    try:
        widths = adapter_target_widths(config)
    except Exception:  # noqa: BLE001 - no readable model yet (a task that builds it): the two cannot be compared
        widths = None
    value = None if widths is None else budget_from_params(param_budget, widths, config.adapter.method,
                                                           int(config.adapter.initial_rank))
    if value != given:
        converts = "" if value is None else f", which converts to adapter.{field}={value} for this model"
        raise ConfigError(f"adapter.{field}={given} and adapter.param_budget={param_budget}{converts}, are both "
                          f"given: give one of them")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_paths(value: Any) -> Any:
    """A comma-separated list of local paths in canonical form (hub ids and other values unchanged)."""
    if not isinstance(value, str):
        return value
    return ",".join(normalise_model_path(part.strip()) for part in value.split(",") if part.strip())


def check_resume(
    config: ml_collections.ConfigDict, previous: str | Mapping[str, Any], same_backbone: bool = False
) -> dict[str, tuple[Any, Any]]:
    """A rerun on an output_dir with checkpoints may change only ``RESUME_CHANGEABLE_FIELDS``; returns those changes.

    ``previous``: the config the checkpoints were trained with (JSON text or dict; ``run.recorded_config``).
    Every refused field is named in one ConfigError. A new length needs ``train.extend_schedule=True``.
    ``same_backbone``: the backbone was already compared by content (resume_identity), so its path may differ.
    """
    if isinstance(previous, str):
        try:
            previous = json.loads(previous)
        except json.JSONDecodeError:
            return {}
    old_fields = {**_flatten(json.loads(base_config().to_json())), **_flatten(previous)}
    changes: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for dotted, new in _flatten(json.loads(config.to_json())).items():
        if dotted not in old_fields:
            continue
        old = old_fields[dotted]
        if dotted in LOCAL_PATH_FIELDS and _as_paths(old) == _as_paths(new):
            continue
        if old == new or dotted == "output_dir":
            continue
        changes[dotted] = (old, new)
        if dotted == "model.name_or_path" and same_backbone:
            continue
        if dotted not in RESUME_CHANGEABLE_FIELDS:
            refused.append(dotted)
    if "train.num_epochs" in changes and int(config.train.num_steps) >= 0:
        del changes["train.num_epochs"]  # not the length while num_steps is set
    if int(config.train.num_steps) == 0:  # evaluate and export only: trains nothing and leaves the planned length
        for dotted in RESUME_LENGTH_FIELDS:
            changes.pop(dotted, None)
    if not config.train.extend_schedule:
        refused += [f for f in RESUME_LENGTH_FIELDS if f in changes]
    if refused:
        length = any(f in RESUME_LENGTH_FIELDS for f in refused)
        raise ConfigError(
            f"output_dir '{config.output_dir}' holds a run trained with "
            + ", ".join(f"{f}={changes[f][0]!r}" for f in refused) + "; this config has "
            + ", ".join(f"{f}={changes[f][1]!r}" for f in refused)
            + ": these change the training, so they cannot change on resume; use the run's values or another "
            "output_dir" + ("" if not length else " (a new length needs --config.train.extend_schedule=True, which "
                                                   "re-plans the learning-rate schedule for it)")
        )
    return changes
