"""Qwen3 export: the PEFT adapter (peft.PeftModel.from_pretrained) and the merged checkpoint (plain transformers)
reproduce the JAX outputs with random adapters of different ranks per module and a trained (changed) head."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from reference_libs import import_reference

torch = import_reference("torch")
from flax import traverse_util

from adapad_jax.models.export import write_merged_checkpoint, write_peft_adapter
from adapad_jax.models.registry import load_model
from test_qwen3 import (
    ARCH_BY_TASK,
    TOL,
    jax_outputs,
    max_diff,
    padded_batch,
    save_checkpoint,
    tiny_config,
    torch_outputs,
    write_qwen3_0_6b_layout,
)

peft = import_reference("peft")

MAX_RANK = 3
SCALING = 0.75


def random_factors(loaded, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{hf_path: (A [r, in], B [out, r])} with r cycling through 0..MAX_RANK (rank-0 modules have no adapter)."""
    rng = np.random.default_rng(seed)
    factors = {}
    for m, target in enumerate(loaded.targets):
        rank = (m + seed) % (MAX_RANK + 1)
        factors[target.hf_path] = (
            (0.3 * rng.standard_normal((rank, target.in_features))).astype(np.float32),
            (0.3 * rng.standard_normal((target.out_features, rank))).astype(np.float32),
        )
    return factors


def lora_from_factors(loaded, factors) -> dict:
    """The evaluation `lora` collection: rows 0..r-1 carry the factors with coef = SCALING, the rest are off."""
    flat = {}
    for target in loaded.targets:
        a, b = factors[target.hf_path]
        rank = a.shape[0]
        pad = MAX_RANK - rank
        flat[target.flax_path + ("a",)] = jnp.asarray(np.pad(a, ((0, pad), (0, 0))))
        flat[target.flax_path + ("b",)] = jnp.asarray(np.pad(b.T, ((0, pad), (0, 0))))
        flat[target.flax_path + ("coef",)] = jnp.asarray([SCALING] * rank + [0.0] * pad, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def trained_head(loaded, seed: int) -> dict:
    """Params with the task head replaced by new random values (as after training)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(loaded.params)
    for path in list(flat):
        if any(path[: len(prefix)] == prefix for prefix in loaded.head_prefixes):
            flat[path] = jnp.asarray(rng.standard_normal(flat[path].shape).astype(np.float32) * 0.5)
    return traverse_util.unflatten_dict(flat)


CASES = {
    # task, how the base checkpoint is written, kwargs transformers needs to load it for the task
    "qa_from_qwen3_0_6b_layout": ("qa", "causal_lm_layout", {"key_mapping": {r"^model\.": "transformer."}}),
    "classification_untied": ("classification", "task_checkpoint", {}),
    "lm_tied": ("lm", "task_checkpoint", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_and_merged_checkpoint_reproduce_jax(tmp_path, case):
    task, layout, load_kwargs = CASES[case]
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    if layout == "causal_lm_layout":
        write_qwen3_0_6b_layout(base_dir)
    else:
        save_checkpoint(base_dir, task, tiny_config(tie_word_embeddings=task == "lm"), seed=31)
    loaded = load_model(str(base_dir), task=task, num_labels=3)
    params = trained_head(loaded, seed=1) if loaded.head_prefixes else loaded.params
    factors = random_factors(loaded, seed=2)
    ids, mask = padded_batch(10, seed=4)
    if layout == "causal_lm_layout":
        mask[:] = 1
    ours = jax_outputs(loaded, ids, mask, params=params, lora=lora_from_factors(loaded, factors))
    assert max_diff(ours, jax_outputs(loaded, ids, mask, params=params)) > 1e-2  # the adapters do something

    write_peft_adapter(adapter_dir, loaded, params, factors, SCALING, str(base_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    exported = {path for path, (a, _) in factors.items() if a.shape[0] > 0}
    assert len(config["rank_pattern"]) == len(exported)
    assert set(config["exclude_modules"] or []) == set(factors) - exported
    base = ARCH_BY_TASK[task].from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager", **load_kwargs)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert max_diff(ours, torch_outputs(with_adapter, ids, mask, task)) <= TOL

    write_merged_checkpoint(merged_dir, loaded, params, factors, SCALING)
    merged = ARCH_BY_TASK[task].from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert max_diff(ours, torch_outputs(merged, ids, mask, task)) <= TOL
    reloaded = load_model(str(merged_dir), task=task, num_labels=3)
    assert reloaded.report.missing == [] and reloaded.report.unexpected == [] and reloaded.report.initialized == []
    assert max_diff(ours, jax_outputs(reloaded, ids, mask)) <= TOL
