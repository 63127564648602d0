"""AdaLoRA's factors -> a native PEFT AdaLoRA adapter directory (``peft_type`` ADALORA) that
``peft.PeftModel.from_pretrained`` loads, in the layout peft 0.21's ``AdaLoraModel`` saves.

What PEFT writes (``AdaLoraModel._get_adapter_state_dict`` / ``resize_state_dict_by_rank_pattern``) and reads back
(``_remap_adapter_state_dict_for_load`` -> ``resize_modules_by_rank_pattern``):

- ``adapter_config.json`` is an ``AdaLoraConfig`` with ``rank_pattern`` = ``{"<module path>.lora_E": [bool] *
  init_r}`` (the triplets kept); PEFT refuses to build the config without ``total_step > 0`` and
  ``tinit < total_step - tfinal``, so the run's schedule is written;
- ``adapter_model.safetensors`` holds, per module, the kept rows only: ``<path>.lora_A`` [r, in],
  ``<path>.lora_E`` [r, 1] and ``<path>.lora_B`` [out, r] (no ``.weight`` suffix: they are parameters, not
  Linear layers), plus the task head (``modules_to_save``);
- on load each module is resized to its kept rows while ``ranknum`` stays ``init_r``, so the scale is still
  ``lora_alpha / (init_r + 1e-5)``.

Modules with no kept triplet are left out of ``target_modules`` (and listed in ``exclude_modules``), as the LoRA
writer does; PEFT would otherwise save zero-sized tensors and warn that they look like unsharded ZeRO-3 shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from adapad_jax.models.base import LoadedModel
from adapad_jax.models.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_TASK_TYPES, head_tensors

_PEFT_PREFIX = "base_model.model."


def write_adalora_adapter(
    out_dir: str | Path,
    model: LoadedModel,
    params: Any,
    slots: Mapping[str, Sequence[np.ndarray]],
    pattern: np.ndarray,
    settings: Mapping[str, Any],
    base_model_name_or_path: str,
) -> Path:
    """Write a PEFT AdaLoRA adapter.

    ``slots``: per module ``a`` [R, in], ``b`` [R, out], ``e`` [R, 1] (R = init_r, our slot-leading layout);
    ``pattern`` [M, R] bool: the kept triplets; ``settings``: the ``AdaLoraConfig`` fields ``init_r``,
    ``target_r``, ``lora_alpha``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``,
    ``total_step``.
    """
    if model.task not in PEFT_TASK_TYPES:
        raise ValueError(f"task '{model.task}' has no PEFT task type (known: {', '.join(PEFT_TASK_TYPES)})")
    pattern = np.asarray(pattern, bool)
    init_r = int(settings["init_r"])
    if pattern.shape != (len(model.targets), init_r):
        raise ValueError(f"rank pattern of shape {pattern.shape}, need ({len(model.targets)}, {init_r})")
    tensors: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, list[bool]] = {}
    for m, target in enumerate(model.targets):
        keep = pattern[m]
        if not keep.any():
            continue
        prefix = f"{_PEFT_PREFIX}{target.hf_path}"
        tensors[f"{prefix}.lora_A"] = np.ascontiguousarray(np.asarray(slots["a"][m], np.float32)[keep])
        tensors[f"{prefix}.lora_E"] = np.ascontiguousarray(np.asarray(slots["e"][m], np.float32)[keep])
        tensors[f"{prefix}.lora_B"] = np.ascontiguousarray(np.asarray(slots["b"][m], np.float32)[keep].T)
        rank_pattern[f"{target.hf_path}.lora_E"] = [bool(k) for k in keep]
    if not rank_pattern:
        raise ValueError("no adapter target keeps a triplet: there is no AdaLoRA adapter to export")
    if model.modules_to_save:
        for name, array in head_tensors(model, model.to_hf_state_dict(params)).items():
            tensors[_PEFT_PREFIX + name] = np.ascontiguousarray(array, dtype=np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    exported = sorted(path[: -len(".lora_E")] for path in rank_pattern)
    config = {
        "peft_type": "ADALORA",
        "task_type": PEFT_TASK_TYPES[model.task],
        "base_model_name_or_path": str(base_model_name_or_path),
        "inference_mode": True,
        "init_r": init_r,
        "target_r": int(settings["target_r"]),
        "lora_alpha": float(settings["lora_alpha"]),
        "lora_dropout": 0.0,
        "tinit": int(settings["tinit"]),
        "tfinal": int(settings["tfinal"]),
        "deltaT": int(settings["deltaT"]),
        "beta1": float(settings["beta1"]),
        "beta2": float(settings["beta2"]),
        "orth_reg_weight": float(settings["orth_reg_weight"]),
        "total_step": int(settings["total_step"]),
        "rank_pattern": dict(sorted(rank_pattern.items())),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": exported,
        "exclude_modules": sorted(t.hf_path for t in model.targets if t.hf_path not in set(exported)) or None,
        "modules_to_save": list(model.modules_to_save) or None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
