"""Flax Qwen3 against the transformers PyTorch model: logits parity, loading, weight mapping, adapters, bf16.

Reference: tiny random Qwen3 checkpoints written by transformers in temp dirs (every parameter, norms
included, drawn at random so that no mapping or layout slip can hide behind ones/zeros).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_libs import import_reference

torch = import_reference("torch")
import transformers
from flax import traverse_util

from adapad_jax.models import qwen3
from adapad_jax.models.base import LoadReport
from adapad_jax.models.checkpoint_io import CheckpointError
from adapad_jax.models.registry import load_hf_config, load_model, model_from_config
from adapad_jax.training.step import with_layer_remat

TOL = 1e-4
VOCAB = 97
PAD = 0
ARCH_BY_TASK = {
    "lm": transformers.Qwen3ForCausalLM,
    "classification": transformers.Qwen3ForSequenceClassification,
    "regression": transformers.Qwen3ForSequenceClassification,
    "qa": transformers.Qwen3ForQuestionAnswering,
}


def tiny_config(**overrides) -> transformers.Qwen3Config:
    """A 2-layer Qwen3 config; head_dim (16) differs from hidden / heads (8) on purpose."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        num_labels=3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    fields.update(overrides)
    return transformers.Qwen3Config(**fields)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with O(1)-scale noise (norm weights around 1) so parity tests are sensitive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))
    return model.eval()


def save_checkpoint(directory: Path, task: str, config: transformers.Qwen3Config, seed: int = 0, **save_kwargs):
    """Build a random transformers model of the task's class, save it, return it (fp32, eval mode, eager attention)."""
    torch.manual_seed(seed)
    model = randomize_(ARCH_BY_TASK[task](config), seed)
    model.save_pretrained(directory, **save_kwargs)
    model.config._attn_implementation = "eager"
    return model


def padded_batch(seq_len: int, seed: int = 0, batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask: row 0 full, row 1 right-padded, row 2 left-padded (when seq_len allows)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (batch, seq_len)).astype(np.int32)
    mask = np.ones_like(ids)
    if seq_len > 2:
        cut = max(1, seq_len * 2 // 3)
        mask[1, cut:] = 0
        mask[2, : seq_len - cut] = 0
    ids[mask == 0] = PAD
    return ids, mask


@functools.cache
def _jitted_apply(module):
    """One compiled apply per (hashable) module definition, reused across calls with the same shapes."""
    return jax.jit(module.apply)


def jax_outputs(loaded, ids, mask, params=None, lora=None) -> dict[str, np.ndarray]:
    variables = {"params": loaded.params if params is None else params}
    if lora is not None:
        variables["lora"] = lora
    out = _jitted_apply(loaded.module)(variables, jnp.asarray(ids), jnp.asarray(mask))
    return {k: np.asarray(v) for k, v in out.items()}


def torch_outputs(model, ids, mask, task) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    keys = ("start_logits", "end_logits") if task == "qa" else ("logits",)
    return {k: getattr(out, k).float().numpy() for k in keys}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def set_head_params(loaded, head_state: dict[str, torch.Tensor]) -> dict:
    """Copy HF head tensors (e.g. a torch model's fresh qa_outputs) into the Flax params."""
    flat = traverse_util.flatten_dict(loaded.params)
    for name, tensor in head_state.items():
        module, kind = name.split(".")
        value = tensor.detach().float().numpy()
        flat[(module, "kernel" if kind == "weight" else "bias")] = jnp.asarray(value.T if kind == "weight" else value)
    return traverse_util.unflatten_dict(flat)


CONFIGS = {
    "tied_gqa1": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
    "untied_gqa2_bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    "gqa4_linear_rope": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    ),
}


@pytest.mark.parametrize("task", ["lm", "classification", "qa"])
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_logits_match_transformers_on_padded_batch(tmp_path, config_name, task):
    config = tiny_config(**CONFIGS[config_name])
    reference = save_checkpoint(tmp_path, task, config, seed=len(config_name))
    loaded = load_model(str(tmp_path), task=task, num_labels=3)
    assert loaded.report.missing == [] and loaded.report.unexpected == [] and loaded.report.initialized == []
    ids, mask = padded_batch(16, seed=1)
    ours, theirs = jax_outputs(loaded, ids, mask), torch_outputs(reference, ids, mask, task)
    assert max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("seq_len", [1, 2, 128])
def test_sequence_lengths_from_1_to_128(tmp_path, seq_len):
    config = tiny_config()
    reference = save_checkpoint(tmp_path, "qa", config, seed=3)
    loaded = load_model(str(tmp_path), task="qa")
    ids, mask = padded_batch(seq_len, seed=seq_len)
    assert max_diff(jax_outputs(loaded, ids, mask), torch_outputs(reference, ids, mask, "qa")) <= TOL


def test_regression_head_and_sliding_window_layers(tmp_path):
    config = tiny_config(use_sliding_window=True, sliding_window=5, max_window_layers=1, num_labels=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    reference = save_checkpoint(tmp_path, "regression", config, seed=5)
    loaded = load_model(str(tmp_path), task="regression", num_labels=1)
    ids, mask = padded_batch(24, seed=2)
    ours = jax_outputs(loaded, ids, mask)
    assert ours["logits"].shape == (3, 1)
    assert max_diff(ours, torch_outputs(reference, ids, mask, "regression")) <= TOL
    # the window matters: the same weights with full attention give other outputs
    full = qwen3.load(tmp_path, tiny_config(num_labels=1), task="regression")
    assert np.abs(jax_outputs(full, ids, mask)["logits"] - ours["logits"]).max() > 1e-3


def test_default_sdpa_attention_agrees_on_real_tokens(tmp_path):
    """transformers' default (sdpa) attention: same outputs at every non-padding position."""
    config = tiny_config()
    save_checkpoint(tmp_path, "lm", config, seed=7)
    reference = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert reference.config._attn_implementation == "sdpa"
    loaded = load_model(str(tmp_path), task="lm")
    ids, mask = padded_batch(20, seed=4)
    ours, theirs = jax_outputs(loaded, ids, mask)["logits"], torch_outputs(reference, ids, mask, "lm")["logits"]
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() <= TOL


def test_classification_pools_last_non_pad_token_as_transformers(tmp_path):
    config = tiny_config()
    reference = save_checkpoint(tmp_path, "classification", config, seed=8)
    loaded = load_model(str(tmp_path), task="classification", num_labels=3)
    ids, mask = padded_batch(9, seed=5)
    ids[0, 4] = PAD  # a pad id inside a sequence: transformers still takes the rightmost non-pad token
    ids[1, :] = PAD  # an all-pad row pools position 0
    assert max_diff(jax_outputs(loaded, ids, mask), torch_outputs(reference, ids, mask, "classification")) <= TOL


def write_qwen3_0_6b_layout(directory: Path, seed: int = 11) -> transformers.Qwen3ForCausalLM:
    """A tiny checkpoint laid out like Qwen/Qwen3-0.6B: Qwen3ForCausalLM, tied, bf16 safetensors, old config fields."""
    config = tiny_config(
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    model = save_checkpoint(directory, "lm", config, seed=seed)
    model.to(torch.bfloat16).save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.pop("pad_token_id", None)
    raw.pop("dtype", None)
    raw.update(
        architectures=["Qwen3ForCausalLM"],
        rope_theta=1000000,
        rope_scaling=None,
        sliding_window=None,
        use_sliding_window=False,
        max_window_layers=2,
        torch_dtype="bfloat16",
        transformers_version="4.51.0",
    )
    (directory / "config.json").write_text(json.dumps(raw))
    return model


def test_qwen3_0_6b_layout_loads_into_every_task(tmp_path):
    write_qwen3_0_6b_layout(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in raw and raw["rope_theta"] == 1e6 and raw["tie_word_embeddings"]
    assert load_hf_config(str(tmp_path))[1].rope_parameters["rope_theta"] == 1e6  # transformers normalises it
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert all(k.startswith("model.") for k in keys) and "lm_head.weight" not in keys
        assert handle.get_tensor(keys[0]).dtype == torch.bfloat16

    ids, mask = padded_batch(12, seed=6)
    mask[:] = 1  # no pad_token_id in this config, as in Qwen3-0.6B
    # QA: transformers itself needs key_mapping to put the model.* backbone under transformer.*
    reference = transformers.Qwen3ForQuestionAnswering.from_pretrained(
        tmp_path, key_mapping={r"^model\.": "transformer."}, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    loaded = load_model(str(tmp_path), task="qa")
    assert loaded.report.initialized == ["qa_outputs.weight", "qa_outputs.bias"]
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    assert loaded.targets[0].hf_path == "transformer.layers.0.self_attn.q_proj"
    head = {k: v for k, v in reference.state_dict().items() if k.startswith("qa_outputs.")}
    params = set_head_params(loaded, head)
    assert max_diff(jax_outputs(loaded, ids, mask, params=params), torch_outputs(reference, ids, mask, "qa")) <= TOL

    lm_reference = transformers.Qwen3ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    lm = load_model(str(tmp_path), task="lm")
    assert lm.report == LoadReport() and "lm_head" not in lm.params
    assert max_diff(jax_outputs(lm, ids[:1], mask[:1]), torch_outputs(lm_reference, ids[:1], mask[:1], "lm")) <= TOL

    cls = load_model(str(tmp_path), task="classification", num_labels=4)
    assert cls.report.initialized == ["score.weight"]
    assert cls.targets[0].hf_path == "model.layers.0.self_attn.q_proj"
    assert jax_outputs(cls, ids[:1], mask[:1])["logits"].shape == (1, 4)
    with pytest.raises(ValueError, match="pad_token_id"):
        jax_outputs(cls, ids, mask)


def test_bare_qwen3model_checkpoint_without_prefix_loads(tmp_path):
    """A Qwen3Model save (no "model." prefix): backbone loads, the untied lm_head is reported as initialised."""
    config = tiny_config()
    torch.manual_seed(0)
    backbone = randomize_(transformers.Qwen3Model(config), seed=19)
    backbone.save_pretrained(tmp_path)
    backbone.config._attn_implementation = "eager"
    loaded = load_model(str(tmp_path), task="lm")
    assert loaded.report.initialized == ["lm_head.weight"] and loaded.report.missing == []
    assert loaded.report.unexpected == []
    ids, mask = padded_batch(7, seed=12)
    with torch.no_grad():
        out = backbone(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
        hidden = out.last_hidden_state
    expected = hidden.numpy() @ np.asarray(loaded.params["lm_head"]["kernel"])
    assert np.abs(jax_outputs(loaded, ids, mask)["logits"] - expected).max() <= TOL


def test_fresh_heads_are_initialised_like_transformers(tmp_path):
    config = tiny_config(hidden_size=64, initializer_range=0.05)
    save_checkpoint(tmp_path, "lm", config)
    qa = load_model(str(tmp_path), task="qa", seed=1)
    assert qa.report.unexpected == ["lm_head.weight"]
    kernel, bias = np.asarray(qa.params["qa_outputs"]["kernel"]), np.asarray(qa.params["qa_outputs"]["bias"])
    assert kernel.shape == (64, 2) and np.all(bias == 0)
    assert 0.6 * 0.05 < kernel.std() < 1.4 * 0.05
    again = load_model(str(tmp_path), task="qa", seed=1)
    other = load_model(str(tmp_path), task="qa", seed=2)
    assert np.array_equal(kernel, np.asarray(again.params["qa_outputs"]["kernel"]))
    assert not np.array_equal(kernel, np.asarray(other.params["qa_outputs"]["kernel"]))


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_bin"])
def test_sharded_and_bin_checkpoints_load(tmp_path, layout):
    config = tiny_config()
    if layout == "sharded_safetensors":
        reference = save_checkpoint(tmp_path, "qa", config, seed=9, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    else:  # transformers 5 writes only safetensors: write a legacy bf16 pickle by hand
        reference = save_checkpoint(tmp_path, "qa", config, seed=9)
        (tmp_path / "model.safetensors").unlink()
        torch.save({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}, tmp_path / "pytorch_model.bin")
        with torch.no_grad():  # the reference holds the bf16-rounded values (parameters only, not the RoPE buffer)
            for param in reference.parameters():
                param.copy_(param.to(torch.bfloat16).float())
    loaded = load_model(str(tmp_path), task="qa")
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    ids, mask = padded_batch(8, seed=8)
    assert max_diff(jax_outputs(loaded, ids, mask), torch_outputs(reference, ids, mask, "qa")) <= TOL


@pytest.mark.parametrize("task,tied", [("lm", True), ("lm", False), ("classification", False), ("qa", True)])
def test_to_hf_state_dict_loads_strictly_into_transformers(tmp_path, task, tied):
    """The inverse mapping gives exactly the task architecture's state dict (names, shapes, values)."""
    config = tiny_config(tie_word_embeddings=tied)
    reference = save_checkpoint(tmp_path, task, config, seed=13)
    loaded = load_model(str(tmp_path), task=task, num_labels=3)
    state = loaded.to_hf_state_dict(loaded.params)
    expected = {k: v for k, v in reference.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(state) == set(expected)
    for name, value in state.items():
        assert value.dtype == np.float32 and np.array_equal(value, expected[name].numpy()), name
    fresh = ARCH_BY_TASK[task](loaded.hf_config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=not tied)
    assert loaded.hf_config.architectures == [loaded.hf_architecture]


def test_adapter_targets_match_transformers_modules():
    config = tiny_config()
    for task in ("qa", "classification"):
        reference = ARCH_BY_TASK[task](config)
        modules = dict(reference.named_modules())
        loaded = qwen3.load(None, config, task=task, num_labels=3)
        assert len(loaded.targets) == 7 * config.num_hidden_layers
        assert loaded.modules_to_save == [{"qa": "qa_outputs"}.get(task, "score")]
        assert loaded.head_prefixes == [(loaded.modules_to_save[0],)]
        flat = traverse_util.flatten_dict(loaded.params)
        for target in loaded.targets:
            linear = modules[target.hf_path]
            assert (linear.in_features, linear.out_features) == (target.in_features, target.out_features)
            assert flat[target.flax_path + ("kernel",)].shape == (target.in_features, target.out_features)
    chosen = qwen3.load(None, config, task="lm", target_names=["v_proj", "q_proj"])
    assert [t.hf_path for t in chosen.targets[:3]] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_random_init_from_config_matches_transformers_statistics():
    config = tiny_config(hidden_size=64, initializer_range=0.05)
    loaded = model_from_config(config, task="classification", seed=0)
    assert loaded.report == LoadReport()
    embed = np.asarray(loaded.params["model"]["embed_tokens"]["embedding"])
    assert np.all(embed[PAD] == 0) and 0.045 < embed[1:].std() < 0.055
    assert np.all(np.asarray(loaded.params["model"]["norm"]["weight"]) == 1)
    ids, mask = padded_batch(5)
    assert np.isfinite(jax_outputs(loaded, ids, mask)["logits"]).all()


def test_bad_inputs_raise_clear_errors(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match="target_names"):
        qwen3.load(None, config, task="lm", target_names=["query_proj"])
    with pytest.raises(ValueError, match="task 'ner'"):
        qwen3.load(None, config, task="ner")
    with pytest.raises(qwen3.Qwen3ConfigError, match="rope_type 'dynamic'"):
        dynamic = tiny_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
        qwen3.load(None, dynamic, task="lm")
    with pytest.raises(ValueError, match="compute dtype"):
        qwen3.load(None, config, task="lm", dtype=jnp.int32)
    save_checkpoint(tmp_path, "lm", tiny_config(hidden_size=48))
    with pytest.raises(CheckpointError, match="shape"):
        qwen3.load(tmp_path, config, task="lm")


# --- adapters -------------------------------------------------------------------------------------------------


def random_lora(loaded, num_rows: int, seed: int, coef_fn) -> dict:
    """A `lora` collection with random a/b on every target and coef_fn(module index) as coefficients."""
    rng = np.random.default_rng(seed)
    flat = {}
    for m, target in enumerate(loaded.targets):
        for name, width in (("a", target.in_features), ("b", target.out_features)):
            flat[target.flax_path + (name,)] = jnp.asarray(0.3 * rng.standard_normal((num_rows, width)), jnp.float32)
        flat[target.flax_path + ("coef",)] = jnp.asarray(coef_fn(m), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def merged_params(loaded, lora) -> dict:
    """Base params with every target's kernel replaced by W + sum_r coef_r a_r^T b_r (closed form)."""
    flat = traverse_util.flatten_dict(loaded.params)
    flat_lora = traverse_util.flatten_dict(lora)
    for target in loaded.targets:
        a, b, coef = (np.asarray(flat_lora[target.flax_path + (n,)]) for n in ("a", "b", "coef"))
        key = target.flax_path + ("kernel",)
        flat[key] = jnp.asarray(np.asarray(flat[key]) + (a.T * coef) @ b)
    return traverse_util.unflatten_dict(flat)


def test_no_lora_and_zero_coef_are_the_base_model():
    loaded = qwen3.load(None, tiny_config(), task="qa", seed=3)
    ids, mask = padded_batch(10)
    base = jax_outputs(loaded, ids, mask)
    zero = jax_outputs(loaded, ids, mask, lora=random_lora(loaded, 3, 0, lambda m: np.zeros(3)))
    # adding an exact zero; the two programs are fused differently by XLA, so allow float32 rounding
    assert max_diff(base, zero) <= 1e-6
    live = jax_outputs(loaded, ids, mask, lora=random_lora(loaded, 3, 0, lambda m: np.ones(3)))
    assert max_diff(base, live) > 1e-3


def test_deflated_forward_of_slot_k_equals_explicit_prefix_model():
    """Rows j<k from the snapshot (committed only), row k live, rows >k off == merged snapshot prefix + slot k."""
    loaded = qwen3.load(None, tiny_config(), task="qa", seed=4)
    num_rows, scale = 4, 0.5
    rng = np.random.default_rng(0)
    committed = rng.random((len(loaded.targets), num_rows)) < 0.6
    live = committed | (rng.random(committed.shape) < 0.5)
    snapshot = random_lora(loaded, num_rows, seed=1, coef_fn=lambda m: np.zeros(num_rows))
    current = random_lora(loaded, num_rows, seed=2, coef_fn=lambda m: np.zeros(num_rows))
    flat_snap, flat_cur = traverse_util.flatten_dict(snapshot), traverse_util.flatten_dict(current)

    def deflated(k: jax.Array) -> dict:
        rows = jnp.arange(num_rows)
        flat = {}
        for m, target in enumerate(loaded.targets):
            p = target.flax_path
            for n in ("a", "b"):
                flat[p + (n,)] = jnp.where((rows < k)[:, None], flat_snap[p + (n,)], flat_cur[p + (n,)])
            coef = jnp.where(rows < k, committed[m], jnp.where(rows == k, live[m], False))
            flat[p + ("coef",)] = scale * coef.astype(jnp.float32)
        return traverse_util.unflatten_dict(flat)

    ids, mask = padded_batch(8, seed=3)

    def forward(k):
        return loaded.module.apply({"params": loaded.params, "lora": deflated(k)}, ids, mask)

    batched = jax.jit(jax.vmap(forward))(jnp.arange(num_rows))
    for k in range(num_rows):
        explicit_lora = {}
        for m, target in enumerate(loaded.targets):
            p = target.flax_path
            rows_a = [np.asarray(flat_snap[p + ("a",)][j]) for j in range(k) if committed[m, j]]
            rows_b = [np.asarray(flat_snap[p + ("b",)][j]) for j in range(k) if committed[m, j]]
            if live[m, k]:
                rows_a.append(np.asarray(flat_cur[p + ("a",)][k]))
                rows_b.append(np.asarray(flat_cur[p + ("b",)][k]))
            explicit_lora[p + ("a",)] = np.array(rows_a).reshape(-1, target.in_features)
            explicit_lora[p + ("b",)] = np.array(rows_b).reshape(-1, target.out_features)
            explicit_lora[p + ("coef",)] = np.full(len(rows_a), scale)
        explicit_params = merged_params(loaded, traverse_util.unflatten_dict(explicit_lora))
        explicit = jax_outputs(loaded, ids, mask, params=explicit_params)
        assert max_diff({n: np.asarray(v[k]) for n, v in batched.items()}, explicit) <= TOL


def test_lora_forward_matches_transformers_with_merged_weights(tmp_path):
    """Adapters through the `lora` collection == transformers with W + s B A merged into every target."""
    config = tiny_config(attention_bias=True)
    reference = save_checkpoint(tmp_path, "classification", config, seed=21)
    loaded = load_model(str(tmp_path), task="classification", num_labels=3)
    lora = random_lora(loaded, 2, seed=5, coef_fn=lambda m: np.array([0.7, -0.4]))
    state = reference.state_dict()
    flat_lora = traverse_util.flatten_dict(lora)
    for target in loaded.targets:
        a, b, coef = (np.asarray(flat_lora[target.flax_path + (n,)]) for n in ("a", "b", "coef"))
        state[target.hf_path + ".weight"] = state[target.hf_path + ".weight"] + torch.from_numpy((b.T * coef) @ a)
    reference.load_state_dict(state)
    ids, mask = padded_batch(11, seed=9)
    ours = jax_outputs(loaded, ids, mask, lora=lora)
    assert max_diff(ours, torch_outputs(reference, ids, mask, "classification")) <= TOL


# bf16 compute: documented tolerance = our bf16 error vs the fp32 reference may be at most 2x transformers' own
# bf16 error on the same weights and inputs, plus 0.02 absolute (logits here are O(1)).
BF16_RELATIVE_TO_TORCH = 2.0
BF16_ABSOLUTE = 0.02


def test_bf16_compute_within_documented_tolerance(tmp_path):
    config = tiny_config()
    reference = save_checkpoint(tmp_path, "qa", config, seed=17)
    fp32 = load_model(str(tmp_path), task="qa")
    bf16 = load_model(str(tmp_path), task="qa", dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16.params)[0].dtype == jnp.float32
    ids, mask = padded_batch(32, seed=10)
    real = mask.astype(bool)
    exact = torch_outputs(reference, ids, mask, "qa")
    ours = jax_outputs(bf16, ids, mask)
    theirs = torch_outputs(reference.to(torch.bfloat16), ids, mask, "qa")
    our_err = max(np.abs(ours[k] - exact[k])[real].max() for k in exact)
    torch_err = max(np.abs(theirs[k] - exact[k])[real].max() for k in exact)
    print(f"bf16 max abs error vs fp32: ours {our_err:.4f}, transformers {torch_err:.4f}")
    assert 0.0 < our_err <= BF16_RELATIVE_TO_TORCH * torch_err + BF16_ABSOLUTE, (our_err, torch_err)
    assert max_diff(jax_outputs(fp32, ids, mask), exact) <= TOL


def test_layer_remat_gives_the_same_outputs_and_adapter_gradients():
    config = tiny_config()
    plain = qwen3.load(None, config, task="qa", seed=6)
    remat = dataclasses.replace(plain, module=with_layer_remat(plain.module))  # adapter.remat's route
    lora = random_lora(plain, 2, seed=3, coef_fn=lambda m: np.ones(2))
    ids, mask = padded_batch(9, seed=2)

    def loss_of(loaded):
        def loss(lora):
            out = loaded.module.apply(
                {"params": loaded.params, "lora": lora},
                ids,
                mask,
                deterministic=False,
                rngs={"dropout": jax.random.PRNGKey(0)},
            )
            return jnp.sum(out["start_logits"] ** 2) + jnp.sum(jnp.tanh(out["end_logits"]))

        return jax.jit(jax.value_and_grad(loss))

    value_plain, grad_plain = loss_of(plain)(lora)
    value_remat, grad_remat = loss_of(remat)(lora)
    assert abs(float(value_plain) - float(value_remat)) <= TOL * max(1.0, abs(float(value_plain)))
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_plain))
    assert largest > 0
    for g1, g2 in zip(jax.tree.leaves(grad_plain), jax.tree.leaves(grad_remat)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-4 * largest)
