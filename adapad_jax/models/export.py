"""Committed adapter slots -> a PEFT LoRA adapter directory, or a merged transformers checkpoint.

Generic over ``LoadedModel``: it needs only ``targets``, ``to_hf_state_dict``, ``modules_to_save``,
``hf_config``, ``hf_architecture`` and ``task``. Neither torch nor peft is imported here; the files are
written in the layout PEFT 0.21 and transformers 5 save and read (checked by the tests).

``factors`` maps a target's ``hf_path`` to ``(A [r, in], B [out, r])`` with the committed slots only, so that
the weight update is ``scaling * B @ A``. PEFT scales by ``alpha_m / r_m``, so each module gets
``alpha_m = scaling * r_m`` in ``alpha_pattern``.
"""

from __future__ import annotations

import collections
import copy
import json
import re
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from adapad_jax.models.base import AdapterTarget, LoadedModel

PEFT_TASK_TYPES = {
    "classification": "SEQ_CLS",
    "regression": "SEQ_CLS",
    "qa": "QUESTION_ANS",
    "lm": "CAUSAL_LM",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_WEIGHTS = "model.safetensors"
MERGED_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_PEFT_PREFIX = "base_model.model."


def factors_in_target_order(
    model: LoadedModel, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> list[tuple[AdapterTarget, np.ndarray, np.ndarray]]:
    """Check ``factors`` against the model's targets; return (target, A, B) in target order, rank-0 dropped."""
    by_path = {t.hf_path: t for t in model.targets}
    unknown = sorted(set(factors) - set(by_path))
    if unknown:
        raise ValueError(f"factors name modules that are not adapter targets of this model: {unknown[:5]}")
    out = []
    for target in model.targets:
        if target.hf_path not in factors:
            continue
        a, b = (np.asarray(x, dtype=np.float32) for x in factors[target.hf_path])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"factors for {target.hf_path}: need A [r, in] and B [out, r], got {a.shape} and {b.shape}"
            )
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise ValueError(
                f"factors for {target.hf_path}: A {a.shape} / B {b.shape} do not fit the layer "
                f"(in {target.in_features}, out {target.out_features})"
            )
        if a.shape[0] > 0:
            out.append((target, np.ascontiguousarray(a), np.ascontiguousarray(b)))
    return out


def _owning_module(tensor_name: str, module_names: list[str]) -> str | None:
    """The entry of ``module_names`` that a tensor belongs to (PEFT's suffix match on any ancestor module)."""
    parts = tensor_name.split(".")[:-1]
    for end in range(1, len(parts) + 1):
        ancestor = ".".join(parts[:end])
        for name in module_names:
            if ancestor == name or ancestor.endswith("." + name):
                return name
    return None


def head_tensors(model: LoadedModel, hf_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state-dict entries of the model's ``modules_to_save`` (the trained task head)."""
    heads = {}
    covered = set()
    for name, array in hf_state.items():
        owner = _owning_module(name, model.modules_to_save)
        if owner is not None:
            heads[name] = array
            covered.add(owner)
    absent = [m for m in model.modules_to_save if m not in covered]
    if absent:
        raise ValueError(f"modules_to_save {absent} have no weights in the model's state dict")
    return heads


def _default_rank(ranks: list[int]) -> int:
    counts = collections.Counter(ranks)
    return max(counts, key=lambda r: (counts[r], r))


def write_peft_adapter(
    out_dir: str | Path,
    model: LoadedModel,
    params: Any,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    scaling: float,
    base_model_name_or_path: str,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``peft.PeftModel.from_pretrained``."""
    if model.task not in PEFT_TASK_TYPES:
        raise ValueError(f"task '{model.task}' has no PEFT task type (known: {', '.join(PEFT_TASK_TYPES)})")
    entries = factors_in_target_order(model, factors)
    if not entries:
        raise ValueError("no adapter target has a committed slot: there is no LoRA adapter to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, np.ndarray] = {}
    for target, a, b in entries:
        tensors[f"{_PEFT_PREFIX}{target.hf_path}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{target.hf_path}.lora_B.weight"] = b
    if model.modules_to_save:
        for name, array in head_tensors(model, model.to_hf_state_dict(params)).items():
            tensors[_PEFT_PREFIX + name] = np.ascontiguousarray(array, dtype=np.float32)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    ranks = {target.hf_path: a.shape[0] for target, a, _ in entries}
    default_r = _default_rank(list(ranks.values()))
    exported = set(ranks)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[model.task],
        "base_model_name_or_path": str(base_model_name_or_path),
        "inference_mode": True,
        "r": default_r,
        "lora_alpha": float(scaling) * default_r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "target_modules": sorted(exported),
        "exclude_modules": sorted(t.hf_path for t in model.targets if t.hf_path not in exported) or None,
        "rank_pattern": {re.escape(path): r for path, r in sorted(ranks.items())},
        "alpha_pattern": {re.escape(path): float(scaling) * r for path, r in sorted(ranks.items())},
        "modules_to_save": list(model.modules_to_save) or None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return out


def merged_state_dict(
    model: LoadedModel, params: Any, factors: Mapping[str, tuple[np.ndarray, np.ndarray]], scaling: float
) -> dict[str, np.ndarray]:
    """The model's HF state dict with ``W0 + scaling * B @ A`` on every adapted module."""
    state = model.to_hf_state_dict(params)
    for target, a, b in factors_in_target_order(model, factors):
        name = f"{target.hf_path}.weight"
        if name not in state:
            raise ValueError(f"to_hf_state_dict has no '{name}' for adapter target {target.hf_path}")
        w0 = state[name]
        delta = float(scaling) * (b.astype(np.float64) @ a.astype(np.float64))
        if delta.shape != w0.shape:
            raise ValueError(f"{name}: weight {w0.shape} and adapter update {delta.shape} differ in shape")
        state[name] = (w0.astype(np.float64) + delta).astype(np.float32)
    return state


def _stored_as(array: np.ndarray, dtype: str) -> np.ndarray:
    """Floating tensors in the merged checkpoint's dtype; integer buffers unchanged."""
    if array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16:
        return array.astype(np.float32).astype(MERGED_DTYPES[dtype])
    return array


def write_merged_checkpoint(
    out_dir: str | Path,
    model: LoadedModel,
    params: Any,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    scaling: float,
    dtype: str = "float32",
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (adapters merged, head included) for plain transformers.

    The merge is computed in float32; ``dtype`` ("float32" or "bfloat16") is what the weights are stored as.
    """
    if dtype not in MERGED_DTYPES:
        raise ValueError(f"merged dtype '{dtype}' is not one of {', '.join(MERGED_DTYPES)}")
    state = merged_state_dict(model, params, factors, scaling)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.hf_config)
    config.architectures = [model.hf_architecture]
    config.dtype = dtype  # what the tensors below are stored as, whatever the source checkpoint's dtype was
    config.save_pretrained(str(out))
    tensors = {name: np.ascontiguousarray(_stored_as(np.asarray(array), dtype)) for name, array in state.items()}
    save_file(tensors, str(out / MERGED_WEIGHTS), metadata={"format": "pt"})
    return out
