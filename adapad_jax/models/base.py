"""What every model family hands to the trainer and the exporter."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence, get_args

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from adapad_jax.adapters.target import AdapterTarget, FlaxPath  # noqa: F401 - part of the model contract

Task = Literal["classification", "regression", "qa", "lm"]
# The heads a model can be built with (every family supports a subset); the loss of each is training/losses.py.
MODEL_TASKS: tuple[str, ...] = get_args(Task)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to build a model: the task head, compute dtype, adapted layers, dropouts and the head's init seed.

    Every loader (``registry.load_model``, ``registry.model_from_config``, each family's ``load``) takes these
    either as one object or as the same keyword arguments.
    """

    task: Task
    num_labels: int = 2
    dtype: Any = jnp.float32  # compute dtype: float32, bfloat16 or float16
    target_names: Sequence[str] | str | None = None  # None: the family's default targets
    adapter_dropout: float = 0.0
    classifier_dropout: float | None = None
    seed: int = 0


def model_options(options: ModelOptions | None, fields: dict[str, Any]) -> ModelOptions:
    """``options`` itself, or one built from keyword ``fields``; not both."""
    if options is None:
        return ModelOptions(**fields)
    if fields:
        raise TypeError(f"give either ModelOptions or keyword options, not both ({sorted(fields)})")
    return options


@dataclasses.dataclass
class LoadReport:
    """Names the loader could not match, and head weights initialised fresh."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    initialized: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LoadedModel:
    """A Flax model with its weights, its adapter targets and its mapping back to transformers names.

    ``module.apply({"params": params, "lora": lora}, **inputs, deterministic=..., rngs=...)`` returns a dict:
    ``{"logits": [B, C]}`` (classification/regression), ``{"start_logits", "end_logits": [B, S]}`` (qa) or
    ``{"logits": [B, S, V]}`` (lm). ``inputs`` are ``input_ids`` and ``attention_mask`` (and ``token_type_ids``
    when the model uses them).
    """

    family: str  # "deberta-v2" or "qwen3"
    task: Task
    module: nn.Module
    params: dict[str, Any]
    hf_config: Any  # transformers.PretrainedConfig
    targets: list[AdapterTarget]
    head_prefixes: list[FlaxPath]  # params subtrees that are the trainable task head
    modules_to_save: list[str]  # HF module names of the head, for PEFT's modules_to_save
    to_hf_state_dict: Callable[[dict[str, Any]], dict[str, np.ndarray]]  # Flax params -> HF names/layouts
    hf_architecture: str  # e.g. "DebertaV2ForSequenceClassification"
    report: LoadReport = dataclasses.field(default_factory=LoadReport)
    uses_token_type_ids: bool = False
    exports_to_peft: bool = True  # False for stand-ins with no transformers counterpart (the toy model)
