"""Qwen3 for AdaPaD: load a Hugging Face checkpoint into the Flax port, list its adapter targets, map back to HF names.

Supported: the Qwen3 architecture of transformers 5.x (RMSNorm, q/k norms, GQA, SwiGLU, tied or untied LM head),
RoPE types ``default``, ``linear``, ``yarn`` and ``llama3`` (others raise), and sliding-window layers
(``use_sliding_window`` / ``layer_types``). Heads: ``lm`` (Qwen3ForCausalLM), ``classification`` / ``regression``
(Qwen3ForSequenceClassification, pooled at the last non-pad token), ``qa`` (Qwen3ForQuestionAnswering, whose
backbone weights live under ``transformer.``). A checkpoint's backbone may carry either prefix (``model.``,
``transformer.``) or none, so a plain Qwen3ForCausalLM checkpoint loads into every task.

Parameters are fp32; ``dtype`` is the compute dtype. Positions are 0..S-1 whatever the padding, as in
transformers when no ``position_ids`` are given (so left padding shifts positions the same way there).
"""

from __future__ import annotations

import copy
import logging
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
    MODEL_TASKS,
    ModelOptions,
    Task,
    model_options,
)
from adapad_jax.models.checkpoint_io import CheckpointError, read_state_dict
from adapad_jax.models.qwen3_modules import (
    DEFAULT_TARGETS,
    PROJECTION_PARENT,
    Qwen3ConfigError,
    Qwen3ForTask,
    Qwen3Spec,
    spec_from_hf_config,
)

__all__ = ["DEFAULT_TARGETS", "Qwen3ConfigError", "hf_architecture", "hf_backbone_prefix", "load", "targets_for_config"]

logger = logging.getLogger(__name__)

_ARCHITECTURES = {
    "lm": "Qwen3ForCausalLM",
    "classification": "Qwen3ForSequenceClassification",
    "regression": "Qwen3ForSequenceClassification",
    "qa": "Qwen3ForQuestionAnswering",
}
_HEAD_MODULE = {"classification": "score", "regression": "score", "qa": "qa_outputs"}
_BACKBONE_PREFIXES = ("model.", "transformer.", "")


def hf_architecture(task: Task) -> str:
    """The transformers class whose names and layout the given task uses."""
    return _ARCHITECTURES[task]


def hf_backbone_prefix(task: Task) -> str:
    """Prefix of the backbone's weights in the task's transformers class ("transformer" for QA, else "model")."""
    return "transformer" if task == "qa" else "model"


def _weight_table(spec: Qwen3Spec, task: Task) -> list[tuple[str, FlaxPath, bool]]:
    """(HF name without backbone prefix for backbone tensors, Flax param path, transpose?) for every parameter."""
    rows: list[tuple[str, FlaxPath, bool]] = [("embed_tokens.weight", ("model", "embed_tokens", "embedding"), False)]
    for i in range(spec.num_layers):
        hf_layer, flax_layer = f"layers.{i}", ("model", f"layers_{i}")
        for name, parent in PROJECTION_PARENT.items():
            rows.append((f"{hf_layer}.{parent}.{name}.weight", (*flax_layer, parent, name, "kernel"), True))
            if parent == "self_attn" and spec.attention_bias:
                rows.append((f"{hf_layer}.{parent}.{name}.bias", (*flax_layer, parent, name, "bias"), False))
        for norm in ("q_norm", "k_norm"):
            rows.append((f"{hf_layer}.self_attn.{norm}.weight", (*flax_layer, "self_attn", norm, "weight"), False))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rows.append((f"{hf_layer}.{norm}.weight", (*flax_layer, norm, "weight"), False))
    rows.append(("norm.weight", ("model", "norm", "weight"), False))
    return rows


def _head_table(spec: Qwen3Spec, task: Task) -> list[tuple[str, FlaxPath, bool]]:
    """Head tensors: full HF name (no backbone prefix involved), Flax path, transpose?."""
    if task == "lm":
        return [] if spec.tie_word_embeddings else [("lm_head.weight", ("lm_head", "kernel"), True)]
    if task == "qa":
        return [
            ("qa_outputs.weight", ("qa_outputs", "kernel"), True),
            ("qa_outputs.bias", ("qa_outputs", "bias"), False),
        ]
    return [("score.weight", ("score", "kernel"), True)]


def _hf_init(hf_name: str, shape: tuple[int, ...], spec: Qwen3Spec, rng: np.random.Generator) -> np.ndarray:
    """A fresh tensor in HF layout, initialised as transformers' _init_weights does."""
    if hf_name.endswith("norm.weight") or hf_name.endswith("layernorm.weight"):
        return np.ones(shape, np.float32)
    if hf_name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    value = (rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.initializer_range)).astype(np.float32)
    if hf_name == "embed_tokens.weight" and spec.pad_token_id is not None and 0 <= spec.pad_token_id < shape[0]:
        value[spec.pad_token_id] = 0.0
    return value


def _split_backbone_prefix(state: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    """Find the prefix the checkpoint's backbone uses ("model.", "transformer." or none); strip it."""
    for prefix in _BACKBONE_PREFIXES:
        if f"{prefix}embed_tokens.weight" in state:
            if prefix:
                return prefix, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            return prefix, {k: v for k, v in state.items() if k.startswith(("embed_tokens.", "layers.", "norm."))}
    raise CheckpointError(
        "checkpoint has no Qwen3 backbone (looked for model.embed_tokens.weight, transformer.embed_tokens.weight, "
        f"embed_tokens.weight; found e.g. {sorted(state)[:5]})"
    )


def _to_float32(name: str, value: np.ndarray) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise CheckpointError(f"checkpoint tensor '{name}' has dtype {value.dtype}, expected a floating-point tensor")
    return np.asarray(value, dtype=np.float32)


def _check_targets(target_names: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(DEFAULT_TARGETS if target_names is None else target_names)
    unknown = [n for n in names if n not in PROJECTION_PARENT]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"Qwen3 target_names {list(names)} invalid: each must be one of {', '.join(DEFAULT_TARGETS)}, "
            f"listed once, at least one (unknown: {unknown})"
        )
    return names


def adapter_targets(spec: Qwen3Spec, task: Task, target_names: Sequence[str]) -> list[AdapterTarget]:
    """Every adapted linear layer, layer-major then in target_names order, with HF and Flax paths and shapes."""
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {
        "q_proj": (spec.hidden_size, q_out),
        "k_proj": (spec.hidden_size, kv_out),
        "v_proj": (spec.hidden_size, kv_out),
        "o_proj": (q_out, spec.hidden_size),
        "gate_proj": (spec.hidden_size, spec.intermediate_size),
        "up_proj": (spec.hidden_size, spec.intermediate_size),
        "down_proj": (spec.intermediate_size, spec.hidden_size),
    }
    prefix = hf_backbone_prefix(task)
    targets = []
    for i in range(spec.num_layers):
        for name in target_names:
            parent = PROJECTION_PARENT[name]
            in_features, out_features = shapes[name]
            targets.append(
                AdapterTarget(
                    hf_path=f"{prefix}.layers.{i}.{parent}.{name}",
                    flax_path=("model", f"layers_{i}", parent, name),
                    in_features=in_features,
                    out_features=out_features,
                )
            )
    return targets


def targets_for_config(hf_config: Any, task: Task, target_names: Sequence[str] | None) -> list[AdapterTarget]:
    """The adapter targets a model built from ``hf_config`` for ``task`` would have (reads the config only)."""
    return adapter_targets(spec_from_hf_config(hf_config), task, _check_targets(target_names))


def _resolve_dtype(dtype: Any) -> Any:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a JAX dtype (use float32, bfloat16 or float16)") from None
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"compute dtype {resolved} is not supported (use float32, bfloat16 or float16)")
    return resolved


def load(
    checkpoint_dir: Path | None, hf_config: Any, options: ModelOptions | None = None, **fields: Any
) -> LoadedModel:
    """Build the Flax Qwen3 for ``task`` and fill it from ``checkpoint_dir`` (None: random init like transformers)."""
    o = model_options(options, fields)
    task, num_labels, dtype, target_names = o.task, o.num_labels, o.dtype, o.target_names
    adapter_dropout, classifier_dropout, seed = o.adapter_dropout, o.classifier_dropout, o.seed
    if task not in MODEL_TASKS:
        raise ValueError(f"task '{task}' is not supported by Qwen3 (supported: {', '.join(MODEL_TASKS)})")
    if task == "regression":
        num_labels = 1
    if task == "classification" and int(num_labels) < 1:
        raise ValueError(f"num_labels must be >= 1 for classification, got {num_labels}")
    for label, rate in (("adapter_dropout", adapter_dropout), ("classifier_dropout", classifier_dropout or 0.0)):
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {rate}")
    spec = spec_from_hf_config(hf_config)
    names = _check_targets(target_names)
    compute_dtype = _resolve_dtype(dtype)
    module = Qwen3ForTask(
        spec=spec,
        task=task,
        num_labels=int(num_labels),
        dtype=compute_dtype,
        adapter_dropout=float(adapter_dropout),
        classifier_dropout=float(classifier_dropout or 0.0),
    )
    backbone_rows = _weight_table(spec, task)
    head_rows = _head_table(spec, task)
    abstract = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    )["params"]
    flax_shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
    table_paths = {path for _, path, _ in backbone_rows + head_rows}
    if table_paths != set(flax_shapes):
        out_of_sync = sorted(table_paths ^ set(flax_shapes))
        raise AssertionError(f"Qwen3 weight table out of sync with the module: {out_of_sync}")

    state: dict[str, np.ndarray] = {} if checkpoint_dir is None else read_state_dict(checkpoint_dir)
    prefix, backbone_state = ("model.", {}) if checkpoint_dir is None else _split_backbone_prefix(state)
    report = LoadReport()
    rng = np.random.Generator(np.random.PCG64(seed))
    flat: dict[FlaxPath, np.ndarray] = {}
    used: set[str] = set()
    for rows, source, is_head in ((backbone_rows, backbone_state, False), (head_rows, state, True)):
        for hf_name, path, transpose in rows:
            hf_shape = flax_shapes[path][::-1] if transpose else flax_shapes[path]
            full_name = hf_name if is_head else f"{hf_backbone_prefix(task)}.{hf_name}"
            if hf_name in source:
                value = _to_float32(hf_name, source[hf_name])
                if value.shape != tuple(hf_shape):
                    raise CheckpointError(
                        f"checkpoint tensor '{(prefix if not is_head else '') + hf_name}' has shape {value.shape}, "
                        f"the {hf_architecture(task)} config expects {tuple(hf_shape)}"
                    )
                used.add(hf_name if is_head else prefix + hf_name)
            else:
                value = _hf_init(hf_name, tuple(hf_shape), spec, rng)
                if checkpoint_dir is not None:
                    (report.initialized if is_head else report.missing).append(full_name)
            flat[path] = value.T if transpose else value
    tied_lm_head = spec.tie_word_embeddings and "lm_head.weight" in state
    report.unexpected = sorted(n for n in state if n not in used and not (tied_lm_head and n == "lm_head.weight"))
    if report.missing:
        logger.warning(
            "Qwen3 checkpoint %s lacks backbone weights (initialised fresh): %s", checkpoint_dir, report.missing
        )
    if report.initialized:
        logger.info("Qwen3 %s head initialised fresh: %s", task, report.initialized)
    params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))

    config = copy.deepcopy(hf_config)
    config.architectures = [hf_architecture(task)]
    if task in ("classification", "regression"):
        config.num_labels = int(num_labels)
        config.problem_type = "regression" if task == "regression" else config.problem_type
    table = [(hf_name, path, transpose, False) for hf_name, path, transpose in backbone_rows] + [
        (hf_name, path, transpose, True) for hf_name, path, transpose in head_rows
    ]
    hf_prefix = hf_backbone_prefix(task)

    def to_hf_state_dict(params: dict[str, Any]) -> dict[str, np.ndarray]:
        """Flax params -> {HF name of the task's architecture: fp32 numpy array in PyTorch layout}."""
        flat_params = traverse_util.flatten_dict(params)
        out = {}
        for hf_name, path, transpose, is_head in table:
            if path not in flat_params:
                raise KeyError(f"params lack {'/'.join(path)} (needed for {hf_name})")
            value = np.asarray(jax.device_get(flat_params[path]), dtype=np.float32)
            out[hf_name if is_head else f"{hf_prefix}.{hf_name}"] = np.array(value.T if transpose else value, order="C")
        return out

    head_prefixes: list[FlaxPath] = [(_HEAD_MODULE[task],)] if task in _HEAD_MODULE else []
    return LoadedModel(
        family="qwen3",
        task=task,
        module=module,
        params=params,
        hf_config=config,
        targets=adapter_targets(spec, task, names),
        head_prefixes=head_prefixes,
        modules_to_save=[_HEAD_MODULE[task]] if task in _HEAD_MODULE else [],
        to_hf_state_dict=to_hf_state_dict,
        hf_architecture=hf_architecture(task),
        report=report,
        uses_token_type_ids=False,
    )
