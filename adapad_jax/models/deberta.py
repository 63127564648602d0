"""DeBERTaV3 (HF model type ``deberta-v2``): build the Flax model, load transformers weights, map names back.

The modules live in ``deberta_modules.py``; this file holds the contract with the rest of the package:
``load(...) -> LoadedModel`` (called by ``models.registry``), the adapter targets, and the two-way mapping
between the Flax parameter tree and transformers' state-dict names.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapad_jax.models.base import (
    AdapterTarget,
    FlaxPath,
    LoadedModel,
    LoadReport,
    ModelOptions,
    Task,
    model_options,
)
from adapad_jax.models.checkpoint_io import CheckpointError, read_state_dict
from adapad_jax.models.deberta_modules import DebertaForTask, DebertaSpec, spec_from_config

log = logging.getLogger(__name__)

FAMILY = "deberta-v2"
BACKBONE_PREFIX = "deberta"
DEFAULT_TARGETS = (
    "query_proj",
    "key_proj",
    "value_proj",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
ARCHITECTURES = {
    "classification": "DebertaV2ForSequenceClassification",
    "regression": "DebertaV2ForSequenceClassification",
    "qa": "DebertaV2ForQuestionAnswering",
}
HEAD_MODULES = {
    "classification": ["pooler", "classifier"],
    "regression": ["pooler", "classifier"],
    "qa": ["qa_outputs"],
}
# Old checkpoints name LayerNorm parameters gamma/beta (transformers renames them on load too).
_LEGACY_LAYER_NORM = {"gamma": "weight", "beta": "bias"}
# A checkpoint missing more than this fraction of the backbone is refused rather than half-initialised.
_MAX_MISSING_BACKBONE_FRACTION = 0.5


def adaptable_layers(spec: DebertaSpec) -> list[str]:
    """Module paths, relative to one encoder layer, of the linear layers that can carry adapters (HF names)."""
    names = ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"]
    if spec.relative_attention and not spec.share_att_key:
        if "c2p" in spec.pos_att_type:
            names.append("attention.self.pos_key_proj")
        if "p2c" in spec.pos_att_type:
            names.append("attention.self.pos_query_proj")
    return names + ["attention.output.dense", "intermediate.dense", "output.dense"]


def _matches(target: str | re.Pattern, full_path: str) -> bool:
    if isinstance(target, re.Pattern):
        return target.fullmatch(full_path) is not None
    return full_path == target or full_path.endswith("." + target)


def adapter_targets(spec: DebertaSpec, target_names: Sequence[str] | str | None) -> list[AdapterTarget]:
    """The adapted modules: PEFT ``target_modules`` semantics (suffix match on a list, full regex match on a str).

    Order: layer-major, then the order of ``target_names`` (first name that matches), then module order.
    """
    if target_names is None:
        target_names = DEFAULT_TARGETS
    if isinstance(target_names, str):
        patterns: list[str | re.Pattern] = [re.compile(target_names)]
    else:
        patterns = list(target_names)
        if not patterns:
            raise ValueError("target_names is empty: give at least one module name to adapt")
    relative = adaptable_layers(spec)
    shapes = {
        "attention.self.query_proj": (spec.hidden_size, spec.all_head_size),
        "attention.self.key_proj": (spec.hidden_size, spec.all_head_size),
        "attention.self.value_proj": (spec.hidden_size, spec.all_head_size),
        "attention.self.pos_key_proj": (spec.hidden_size, spec.all_head_size),
        "attention.self.pos_query_proj": (spec.hidden_size, spec.all_head_size),
        "attention.output.dense": (spec.all_head_size, spec.hidden_size),
        "intermediate.dense": (spec.hidden_size, spec.intermediate_size),
        "output.dense": (spec.intermediate_size, spec.hidden_size),
    }
    used = [False] * len(patterns)
    targets = []
    for layer in range(spec.num_layers):
        ranked = []
        for position, rel in enumerate(relative):
            full = f"{BACKBONE_PREFIX}.encoder.layer.{layer}.{rel}"
            hits = [i for i, p in enumerate(patterns) if _matches(p, full)]
            for i in hits:
                used[i] = True
            if hits:
                ranked.append((hits[0], position, rel, full))
        for _, _, rel, full in sorted(ranked):
            flax_path = (BACKBONE_PREFIX, "encoder", f"layer_{layer}", *rel.split("."))
            in_features, out_features = shapes[rel]
            targets.append(AdapterTarget(full, flax_path, in_features, out_features))
    unused = [str(p.pattern if isinstance(p, re.Pattern) else p) for p, u in zip(patterns, used) if not u]
    if unused:
        raise ValueError(
            f"target_names {unused} match no adaptable DeBERTa layer (adaptable, per encoder layer: "
            f"{', '.join(relative)})"
        )
    return targets


def targets_for_config(hf_config: Any, task: Task, target_names: Sequence[str] | str | None) -> list[AdapterTarget]:
    """The adapter targets a model built from ``hf_config`` would have (reads the config only; same for every task)."""
    return adapter_targets(spec_from_config(hf_config), target_names)


def _flax_key_to_hf(key: tuple[str, ...]) -> tuple[str, bool]:
    """Flat Flax param key -> (HF state-dict name, whether the array is a kernel to transpose)."""
    *modules, leaf = key
    parts = [re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in modules]
    if leaf == "kernel":
        return ".".join(parts + ["weight"]), True
    if leaf in ("embedding", "scale"):
        return ".".join(parts + ["weight"]), False
    if leaf == "bias":
        return ".".join(parts + ["bias"]), False
    raise ValueError(f"unexpected parameter name {'/'.join(key)} in the DeBERTa tree")


def to_hf_state_dict(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> transformers state dict (HF names, [out, in] linear weights, float32 numpy)."""
    out = {}
    for key, value in traverse_util.flatten_dict(params).items():
        name, transpose = _flax_key_to_hf(key)
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


def _canonical_hf_name(name: str) -> str:
    """Checkpoint tensor name -> the name in a task model (adds ``deberta.`` to bare backbone names)."""
    parts = name.split(".")
    if parts[-1] in _LEGACY_LAYER_NORM and len(parts) > 1 and parts[-2] == "LayerNorm":
        parts[-1] = _LEGACY_LAYER_NORM[parts[-1]]
    if parts[0] in ("embeddings", "encoder"):
        parts = [BACKBONE_PREFIX] + parts
    return ".".join(parts)


def _is_head(name: str, task: Task) -> bool:
    return name.split(".")[0] in HEAD_MODULES[task]


def load_weights(
    params: dict[str, Any], state: dict[str, np.ndarray], task: Task, source: str
) -> tuple[dict[str, Any], LoadReport]:
    """Overwrite freshly initialised ``params`` with checkpoint tensors; report what did not match."""
    flat = traverse_util.flatten_dict(params)
    expected: dict[str, tuple[tuple[str, ...], bool]] = {}
    for key in flat:
        name, transpose = _flax_key_to_hf(key)
        expected[name] = (key, transpose)
    report = LoadReport()
    found = set()
    for raw_name, tensor in state.items():
        name = _canonical_hf_name(raw_name)
        if name not in expected:
            report.unexpected.append(raw_name)
            continue
        key, transpose = expected[name]
        array = np.asarray(tensor, dtype=np.float32)
        array = array.T if transpose else array
        if array.shape != flat[key].shape:
            hf_shape = tuple(reversed(flat[key].shape)) if transpose else flat[key].shape
            if _is_head(name, task):
                log.warning("head weight %s has shape %s, the model needs %s: initialising it fresh",
                            raw_name, tuple(tensor.shape), hf_shape)
                report.unexpected.append(raw_name)
                continue
            raise CheckpointError(
                f"checkpoint '{source}': tensor '{raw_name}' has shape {tuple(tensor.shape)}, the config "
                f"needs {hf_shape}"
            )
        flat[key] = np.ascontiguousarray(array)
        found.add(name)
    backbone = [n for n in expected if not _is_head(n, task)]
    report.missing = [n for n in backbone if n not in found]
    report.initialized = [n for n in expected if _is_head(n, task) and n not in found]
    if len(report.missing) > _MAX_MISSING_BACKBONE_FRACTION * len(backbone):
        raise CheckpointError(
            f"checkpoint '{source}' lacks {len(report.missing)} of {len(backbone)} DeBERTa backbone tensors "
            f"(e.g. {', '.join(report.missing[:5])}); is it a deberta-v2 checkpoint matching its config.json?"
        )
    if report.missing:
        log.warning("backbone weights missing from %s (left at random init): %s", source, report.missing)
    if report.initialized:
        log.info("head weights initialised fresh: %s", report.initialized)
    return traverse_util.unflatten_dict(flat), report


def _task_config(hf_config: Any, task: Task, num_labels: int, classifier_dropout: float | None) -> tuple[Any, int]:
    """A copy of the config set up for the task (num_labels, problem_type, architectures)."""
    if getattr(hf_config, "model_type", FAMILY) != FAMILY:
        raise ValueError(f"config model_type is '{hf_config.model_type}', expected '{FAMILY}'")
    if task not in ARCHITECTURES:
        raise ValueError(f"task '{task}' is not supported for DeBERTa (supported: {', '.join(ARCHITECTURES)})")
    if task == "classification":
        if num_labels < 2:
            raise ValueError(f"classification needs num_labels >= 2, got {num_labels} (use task='regression')")
    elif task == "regression":
        num_labels = 1
    else:
        num_labels = 2
    config = copy.deepcopy(hf_config)
    config.num_labels = num_labels
    config.problem_type = "regression" if task == "regression" else (
        "single_label_classification" if task == "classification" else None
    )
    if classifier_dropout is not None:
        config.cls_dropout = classifier_dropout
    config.architectures = [ARCHITECTURES[task]]
    return config, num_labels


def init_params(module: DebertaForTask, spec: DebertaSpec, seed: int) -> dict[str, Any]:
    """Random fp32 parameters per transformers' scheme: normal(0, initializer_range) for linear and embedding
    weights, zero biases, LayerNorm scale one (built from shapes alone, so no compilation)."""
    dummy = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy, dummy, dummy)["params"]
    rng = np.random.default_rng(seed)
    flat = {}
    for key, leaf in traverse_util.flatten_dict(shapes).items():
        if key[-1] in ("kernel", "embedding"):
            value = rng.normal(0.0, spec.initializer_range, leaf.shape)
        elif key[-1] == "scale":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        flat[key] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def load(
    checkpoint_dir: Path | None, hf_config: Any, options: ModelOptions | None = None, **fields: Any
) -> LoadedModel:
    """Build the Flax DeBERTa for ``task`` and load ``checkpoint_dir`` (None: random init as transformers)."""
    o = model_options(options, fields)
    task, num_labels, dtype, target_names = o.task, o.num_labels, o.dtype, o.target_names
    adapter_dropout, classifier_dropout, seed = o.adapter_dropout, o.classifier_dropout, o.seed
    config, num_labels = _task_config(hf_config, task, num_labels, classifier_dropout)
    spec = spec_from_config(config, classifier_dropout)
    module = DebertaForTask(
        spec, task=task, num_labels=num_labels, dtype=dtype, adapter_dropout=adapter_dropout,
    )
    targets = adapter_targets(spec, target_names)
    params = init_params(module, spec, seed)
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is not None and 0 <= pad_id < spec.vocab_size:
        params["deberta"]["embeddings"]["word_embeddings"]["embedding"][pad_id] = 0.0
    report = LoadReport()
    if checkpoint_dir is not None:
        state = read_state_dict(checkpoint_dir)
        params, report = load_weights(params, state, task, str(checkpoint_dir))
    else:
        names = (_flax_key_to_hf(key)[0] for key in traverse_util.flatten_dict(params))
        report.initialized = sorted(name for name in names if _is_head(name, task))
    params = jax.tree.map(jnp.asarray, params)
    head_prefixes: list[FlaxPath] = [(m,) for m in HEAD_MODULES[task]]
    return LoadedModel(
        family=FAMILY,
        task=task,
        module=module,
        params=params,
        hf_config=config,
        targets=targets,
        head_prefixes=head_prefixes,
        modules_to_save=list(HEAD_MODULES[task]),
        to_hf_state_dict=to_hf_state_dict,
        hf_architecture=ARCHITECTURES[task],
        report=report,
        uses_token_type_ids=spec.type_vocab_size > 0,
    )
