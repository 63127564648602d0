"""One entry point that reads a checkpoint's config.json and builds the matching Flax model."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from adapad_jax.models.base import AdapterTarget, LoadedModel, ModelOptions, Task, model_options
from adapad_jax.models.checkpoint_io import CheckpointError, resolve_checkpoint_dir

# HF model_type -> module in adapad_jax.models that implements `load(...)` and `targets_for_config(...)`.
FAMILIES = {"deberta-v2": "deberta", "qwen3": "qwen3"}


def _family_module(model_type: str | None):
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return importlib.import_module(f"adapad_jax.models.{FAMILIES[model_type]}")


def load_hf_config(
    name_or_path: str, config_overrides: Mapping[str, Any] | None = None, revision: str | None = None
) -> tuple[Path, Any]:
    """Resolve a checkpoint (downloading a hub id on first use) and read its config through transformers.

    transformers normalises old config formats. ``revision``: hub branch, tag or commit (None = default branch).

    ``config_overrides``: attributes set on the config after reading it (e.g. ``{"pad_token_id": 0}``).
    """
    from transformers import AutoConfig

    checkpoint_dir = resolve_checkpoint_dir(name_or_path, revision)
    try:
        hf_config = AutoConfig.from_pretrained(str(checkpoint_dir))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read config.json of '{checkpoint_dir}': {err}") from None
    for name, value in (config_overrides or {}).items():
        setattr(hf_config, name, value)
    return checkpoint_dir, hf_config


def targets_for_config(hf_config: Any, task: Task, target_names: Sequence[str] | None) -> list[AdapterTarget]:
    """The adapter targets of a model built from ``hf_config`` (reads the config only, builds nothing).

    Raises CheckpointError for an unsupported model type, ValueError for target names the family rejects.
    """
    family = _family_module(getattr(hf_config, "model_type", None))
    return family.targets_for_config(hf_config, task, target_names)


def _build(checkpoint_dir: Path | None, hf_config: Any, options: ModelOptions) -> LoadedModel:
    """The family's ``load(checkpoint_dir, hf_config, options)`` for ``hf_config.model_type``."""
    return _family_module(hf_config.model_type).load(checkpoint_dir, hf_config, options)


def load_model(
    name_or_path: str,
    options: ModelOptions | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    **fields: Any,
) -> LoadedModel:
    """Load a Hugging Face checkpoint (local dir or hub id) as a Flax model with adapter targets.

    ``options`` (or the same fields as keywords: ``task``, ``num_labels``, ``dtype``, ...) say how to build it;
    ``config_overrides`` are set on the checkpoint's config before the model is built, and the model's
    ``hf_config`` (and so an exported merged checkpoint) keeps them.
    """
    checkpoint_dir, hf_config = load_hf_config(name_or_path, config_overrides)
    return _build(checkpoint_dir, hf_config, model_options(options, fields))


def model_from_config(hf_config: Any, options: ModelOptions | None = None, **fields: Any) -> LoadedModel:
    """Build a randomly initialised model from a transformers config (benchmarks, demos)."""
    return _build(None, hf_config, model_options(options, fields))
