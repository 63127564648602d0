"""One entry point that reads a checkpoint's config.json and builds the matching Flax model."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp

from adapad_jax.models.base import LoadedModel, Task
from adapad_jax.models.checkpoint_io import CheckpointError, resolve_checkpoint_dir

# HF model_type -> module in adapad_jax.models that implements `load(...)`.
FAMILIES = {"deberta-v2": "deberta", "qwen3": "qwen3"}


def _family_module(model_type: str):
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return importlib.import_module(f"adapad_jax.models.{FAMILIES[model_type]}")


def load_hf_config(name_or_path: str) -> tuple[Path, Any]:
    """Resolve a checkpoint and read its config through transformers (which normalises old formats)."""
    from transformers import AutoConfig

    checkpoint_dir = resolve_checkpoint_dir(name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(str(checkpoint_dir))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read config.json of '{checkpoint_dir}': {err}") from None
    return checkpoint_dir, hf_config


def load_model(
    name_or_path: str,
    *,
    task: Task,
    num_labels: int = 2,
    dtype: Any = jnp.float32,
    target_names: Sequence[str] | None = None,
    adapter_dropout: float = 0.0,
    classifier_dropout: float | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a Hugging Face checkpoint (local dir or cached hub id) as a Flax model with adapter targets."""
    checkpoint_dir, hf_config = load_hf_config(name_or_path)
    family = _family_module(hf_config.model_type)
    return family.load(
        checkpoint_dir,
        hf_config,
        task=task,
        num_labels=num_labels,
        dtype=dtype,
        target_names=target_names,
        adapter_dropout=adapter_dropout,
        classifier_dropout=classifier_dropout,
        seed=seed,
    )


def model_from_config(
    hf_config: Any,
    *,
    task: Task,
    num_labels: int = 2,
    dtype: Any = jnp.float32,
    target_names: Sequence[str] | None = None,
    adapter_dropout: float = 0.0,
    classifier_dropout: float | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build a randomly initialised model from a transformers config (benchmarks, demos)."""
    family = _family_module(hf_config.model_type)
    return family.load(
        None,
        hf_config,
        task=task,
        num_labels=num_labels,
        dtype=dtype,
        target_names=target_names,
        adapter_dropout=adapter_dropout,
        classifier_dropout=classifier_dropout,
        seed=seed,
    )
