"""DeBERTaV3 Flax port: parity with transformers' PyTorch model, loading, adapter targets, deflated forward, bf16."""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_libs import import_reference
from flax import traverse_util

from adapad_jax.models import deberta
from adapad_jax.models.checkpoint_io import CheckpointError
from adapad_jax.models.deberta_modules import log_bucket_position, parse_pos_att_type
from adapad_jax.models.registry import load_hf_config, load_model, model_from_config
from adapad_jax.training.step import with_layer_remat
from helpers_hf import (
    max_abs_diff,
    padded_batch,
    save_torch_model,
    tiny_deberta_config,
    torch_deberta,
    torch_outputs,
    write_deberta_v3_base_layout,
)

torch = import_reference("torch")

PARITY_TOL = 1e-4
# bf16 compute (fp32 params, fp32 softmax and LayerNorm statistics) vs fp32 compute. bf16 keeps 8 mantissa bits
# (relative step 2^-8 ~ 4e-3). On the tiny test model (init std 0.3: sharp attention, logits up to ~5), over six
# random checkpoints the QA logits moved by 1.5-7% of max |logit| at worst and 0.4-0.9% on average.
BF16_MAX_REL_TOL = 0.1  # max |bf16 - fp32| / max |fp32|
BF16_MEAN_REL_TOL = 0.015  # mean |bf16 - fp32| / max |fp32|

CONFIGS = {
    "v3": {},
    "v2_style": dict(
        share_att_key=False,
        pos_att_type=["c2p", "p2c"],
        position_buckets=-1,
        max_relative_positions=16,
        norm_rel_ebd="none",
        position_biased_input=True,
        type_vocab_size=2,
        embedding_size=24,
        hidden_act="gelu_new",
    ),
    "c2p_only": dict(pos_att_type=["c2p"], position_buckets=32, max_relative_positions=64, share_att_key=False),
    "p2c_only_shared": dict(pos_att_type="p2c", position_buckets=4, max_relative_positions=256),
    "no_relative": dict(relative_attention=False, position_biased_input=True, type_vocab_size=2),
}


@functools.cache
def _checkpoint(root: Path, config_name: str, task: str) -> tuple[Path, object]:
    config = tiny_deberta_config(task, **CONFIGS[config_name])
    model = torch_deberta(config, task, seed=zlib.crc32(f"{config_name}-{task}".encode()) % 1000)
    return save_torch_model(model, root / f"{config_name}-{task}"), model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("deberta")
    return lambda config_name, task: _checkpoint(root, config_name, task)


def _batch(config_name: str, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    type_vocab = tiny_deberta_config(**CONFIGS[config_name]).type_vocab_size
    return padded_batch(3, seq_len, 64, seed=seed, type_vocab_size=type_vocab)


@pytest.mark.parametrize("max_position", [16, 64, 128, 512])
@pytest.mark.parametrize("bucket_size", [4, 8, 32, 256])
def test_log_buckets_match_transformers(bucket_size, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = np.arange(-700, 701)
    expected = make_log_bucket_position(torch.from_numpy(rel), bucket_size, max_position).long().numpy()
    np.testing.assert_array_equal(log_bucket_position(rel, bucket_size, max_position), expected)


@pytest.mark.parametrize(
    "config_name,task,seq_lens",
    [
        ("v3", "classification", (1, 5, 128)),
        ("v3", "regression", (9,)),
        ("v3", "qa", (1, 33)),
        ("v2_style", "classification", (40,)),
        ("c2p_only", "qa", (70,)),
        ("p2c_only_shared", "regression", (128,)),
        ("no_relative", "classification", (12,)),
    ],
)
def test_logits_match_transformers(checkpoint, config_name, task, seq_lens):
    path, torch_model = checkpoint(config_name, task)
    model = load_model(str(path), task=task, num_labels=3)
    assert model.report.missing == [] and model.report.unexpected == [] and model.report.initialized == []
    apply = jax.jit(model.module.apply)
    for seq_len in seq_lens:
        batch = _batch(config_name, seq_len, seed=seq_len)
        ours = apply({"params": model.params}, **batch)
        reference = torch_outputs(torch_model, batch, task)
        scale = max(float(np.abs(v).max()) for v in reference.values())
        assert scale > 0.1, "reference logits too small for the tolerance to mean anything"
        assert max_abs_diff(ours, reference) <= PARITY_TOL, (config_name, task, seq_len)


def test_real_deberta_v3_base_layout_loads(tmp_path):
    written = write_deberta_v3_base_layout(tmp_path / "deberta-v3-base")
    model = load_model(str(tmp_path / "deberta-v3-base"), task="classification", num_labels=3)
    pretraining_heads = sorted(n for n in written if n.startswith(("lm_predictions.", "mask_predictions.")))
    assert sorted(model.report.unexpected) == pretraining_heads
    assert model.report.missing == []
    assert sorted(model.report.initialized) == [
        "classifier.bias", "classifier.weight", "pooler.dense.bias", "pooler.dense.weight"
    ]
    # Fresh head as transformers initialises it: normal(0, initializer_range) weights, zero biases.
    head = model.params["classifier"]
    assert np.all(np.asarray(head["bias"]) == 0)
    assert abs(float(np.std(head["kernel"])) - 0.3) < 0.1
    assert model.hf_config.pos_att_type == ["p2c", "c2p"]

    from transformers import DebertaV2ForSequenceClassification

    reference_model = DebertaV2ForSequenceClassification.from_pretrained(
        str(tmp_path / "deberta-v3-base"), num_labels=3
    ).eval()
    head_state = {
        k: v.numpy() for k, v in reference_model.state_dict().items() if k.startswith(("pooler.", "classifier."))
    }
    params = jax.tree.map(lambda x: x, model.params)
    params["pooler"]["dense"] = {"kernel": head_state["pooler.dense.weight"].T, "bias": head_state["pooler.dense.bias"]}
    params["classifier"] = {"kernel": head_state["classifier.weight"].T, "bias": head_state["classifier.bias"]}
    batch = _batch("v3", 24)
    ours = jax.jit(model.module.apply)({"params": params}, **batch)
    assert max_abs_diff(ours, torch_outputs(reference_model, batch, "classification")) <= PARITY_TOL


def test_bare_backbone_checkpoint_and_legacy_layer_norm_names(tmp_path):
    from safetensors.torch import save_file
    from transformers import DebertaV2Model

    config = tiny_deberta_config("qa")
    backbone = DebertaV2Model(config)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    assert all(k.startswith(("embeddings.", "encoder.")) for k in state)
    state["embeddings.LayerNorm.gamma"] = state.pop("embeddings.LayerNorm.weight")
    state["embeddings.LayerNorm.beta"] = state.pop("embeddings.LayerNorm.bias") + 0.5
    config.save_pretrained(str(tmp_path))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(str(tmp_path), task="qa")
    assert model.report.missing == [] and model.report.unexpected == []
    assert sorted(model.report.initialized) == ["qa_outputs.bias", "qa_outputs.weight"]
    ln = model.params["deberta"]["embeddings"]["LayerNorm"]
    np.testing.assert_array_equal(ln["bias"], state["embeddings.LayerNorm.beta"].numpy())
    np.testing.assert_array_equal(
        model.params["deberta"]["encoder"]["layer_1"]["attention"]["self"]["key_proj"]["kernel"],
        state["encoder.layer.1.attention.self.key_proj.weight"].numpy().T,
    )


def _write_safetensors_checkpoint(directory: Path, config, state: dict) -> Path:
    from safetensors.torch import save_file

    directory.mkdir()
    config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def test_missing_and_mismatched_weights_are_reported(checkpoint, tmp_path):
    _, torch_model = checkpoint("v3", "classification")
    config = torch_model.config
    state = dict(torch_model.state_dict())
    dropped = ["deberta.encoder.layer.1.output.dense.bias", "deberta.encoder.rel_embeddings.weight"]
    few_missing = {k: v for k, v in state.items() if k not in dropped}
    model = load_model(str(_write_safetensors_checkpoint(tmp_path / "few", config, few_missing)), task="classification",
                       num_labels=3)
    assert sorted(model.report.missing) == sorted(dropped)

    most_missing = {k: v for k, v in state.items() if "layer.1" not in k and "layer.0" not in k}
    with pytest.raises(CheckpointError, match="lacks .* backbone tensors"):
        load_model(str(_write_safetensors_checkpoint(tmp_path / "most", config, most_missing)), task="classification",
                   num_labels=3)

    bad_shape = dict(state, **{"deberta.encoder.layer.0.intermediate.dense.weight": torch.zeros(5, 32)})
    with pytest.raises(CheckpointError, match="intermediate.dense.weight' has shape"):
        load_model(str(_write_safetensors_checkpoint(tmp_path / "shape", config, bad_shape)), task="classification",
                   num_labels=3)

    # A 3-label head loaded for a 2-label task: re-initialised and named, as with ignore_mismatched_sizes.
    model = load_model(str(_write_safetensors_checkpoint(tmp_path / "head", config, state)), task="classification",
                       num_labels=2)
    assert sorted(model.report.initialized) == ["classifier.bias", "classifier.weight"]
    assert model.params["classifier"]["kernel"].shape == (32, 2)


def _backbone_lora_modules(config, target_modules) -> dict[str, tuple[int, int]]:
    """Modules PEFT wraps in a DebertaV2Model for these target_modules, named as in the task model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import DebertaV2Model

    peft_model = get_peft_model(DebertaV2Model(config), LoraConfig(r=1, target_modules=target_modules))
    return {
        "deberta." + name.removeprefix("base_model.model."): (m.in_features, m.out_features)
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }


@pytest.mark.parametrize(
    "config_name,target_names",
    [
        ("v3", None),
        ("v2_style", None),
        ("v2_style", ["query_proj"]),
        ("v2_style", ["pos_key_proj", "dense"]),
        ("c2p_only", r".*layer\.1\..*_proj"),
    ],
)
def test_adapter_targets_are_the_modules_peft_wraps(config_name, target_names):
    config = tiny_deberta_config(**CONFIGS[config_name])
    model = model_from_config(config, task="classification", num_labels=3, target_names=target_names)
    expected = _backbone_lora_modules(config, list(deberta.DEFAULT_TARGETS) if target_names is None else target_names)
    assert {t.hf_path: (t.in_features, t.out_features) for t in model.targets} == expected
    flat = traverse_util.flatten_dict(model.params)
    for t in model.targets:
        assert flat[t.flax_path + ("kernel",)].shape == (t.in_features, t.out_features)
    layers = [int(t.hf_path.split(".")[3]) for t in model.targets]
    assert layers == sorted(layers)


def test_default_target_order_and_bad_targets():
    config = tiny_deberta_config()
    model = model_from_config(config, task="classification", num_labels=3)
    names = [t.hf_path.split(".", 4)[4] for t in model.targets[:6]]
    assert names == [
        "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
        "attention.output.dense", "intermediate.dense", "output.dense",
    ]
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no adaptable DeBERTa layer"):
        model_from_config(config, task="classification", target_names=["query_proj", "q_proj"])
    with pytest.raises(ValueError, match="num_labels >= 2"):
        model_from_config(config, task="classification", num_labels=1)
    with pytest.raises(ValueError, match="task 'lm' is not supported"):
        model_from_config(config, task="lm")
    with pytest.raises(ValueError, match="unknown entries"):
        parse_pos_att_type("p2c|c2c")


def test_random_init_follows_transformers_scheme():
    config = tiny_deberta_config(pad_token_id=3, initializer_range=0.05, intermediate_size=256)
    model = model_from_config(config, task="regression", seed=1)
    assert model.hf_config.num_labels == 1 and model.hf_config.problem_type == "regression"
    assert sorted(model.report.initialized) == [
        "classifier.bias", "classifier.weight", "pooler.dense.bias", "pooler.dense.weight"
    ]
    hf = model.to_hf_state_dict(model.params)
    assert abs(float(hf["deberta.encoder.layer.0.intermediate.dense.weight"].std()) - 0.05) < 0.005
    assert np.all(hf["deberta.encoder.layer.0.intermediate.dense.bias"] == 0)
    assert np.all(hf["deberta.encoder.LayerNorm.weight"] == 1)
    assert np.all(hf["deberta.embeddings.word_embeddings.weight"][3] == 0)
    assert hf["deberta.encoder.rel_embeddings.weight"].shape == (16, 32)
    assert all(v.dtype == np.float32 for v in hf.values())
    torch_names = set(torch_deberta(config, "regression").state_dict())
    assert set(hf) == torch_names


def _random_slots(model, r_max: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        t.hf_path: (
            rng.normal(0, 0.3, (r_max, t.in_features)).astype(np.float32),
            rng.normal(0, 0.3, (r_max, t.out_features)).astype(np.float32),
        )
        for t in model.targets
    }


def test_deflated_forward_equals_explicitly_merged_slots(checkpoint):
    """Slot k's forward (snapshot rows j<k with committed coefs, live row k) == W0 + those rank-1 terms merged."""
    path, _ = checkpoint("v3", "classification")
    model = load_model(str(path), task="classification", num_labels=3)
    r_max, s = 3, 0.7
    slots = _random_slots(model, r_max, seed=1)
    rng = np.random.default_rng(2)
    committed = {p: rng.random(r_max) < 0.6 for p in slots}

    def coef_for(path: str, k: int) -> np.ndarray:
        coef = np.where(committed[path], s, 0.0).astype(np.float32)
        coef[k] = s
        coef[k + 1:] = 0.0
        return coef

    lora_per_k = []
    for k in range(r_max):
        flat = {}
        for t in model.targets:
            a, b = slots[t.hf_path]
            flat[t.flax_path + ("a",)] = a
            flat[t.flax_path + ("b",)] = b
            flat[t.flax_path + ("coef",)] = coef_for(t.hf_path, k)
        lora_per_k.append(traverse_util.unflatten_dict(flat))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *lora_per_k)
    batch = _batch("v3", 16)

    apply = jax.jit(model.module.apply)

    def forward(lora):
        return model.module.apply({"params": model.params, "lora": lora}, **batch)["logits"]

    deflated = jax.jit(jax.vmap(forward))(stacked)
    base = apply({"params": model.params}, **batch)["logits"]
    flat_params = traverse_util.flatten_dict(model.params)
    for k in range(r_max):
        merged = dict(flat_params)
        for t in model.targets:
            a, b = slots[t.hf_path]
            coef = coef_for(t.hf_path, k)
            merged[t.flax_path + ("kernel",)] = flat_params[t.flax_path + ("kernel",)] + np.einsum(
                "ri,r,ro->io", a, coef, b
            )
        explicit = apply({"params": traverse_util.unflatten_dict(merged)}, **batch)["logits"]
        assert float(jnp.max(jnp.abs(explicit - base))) > 1e-2, "adapters should change the logits"
        np.testing.assert_allclose(deflated[k], explicit, atol=2e-5)

    zero_coef = jax.tree.map(lambda x: x, lora_per_k[0])
    for t in model.targets:
        node = functools.reduce(lambda d, key: d[key], t.flax_path, zero_coef)
        node["coef"] = np.zeros(r_max, np.float32)
    no_adapter = apply({"params": model.params, "lora": zero_coef}, **batch)["logits"]
    np.testing.assert_allclose(no_adapter, base, atol=1e-5)  # zero coefficients: the base model


def test_adapter_dropout_reaches_every_adapted_layer(checkpoint):
    """adapter_dropout=0.5 in training: every adapted layer's output is x W + bias + ((m * x / 0.5) a^T coef) b
    for a 0/1 mask m on its own input, read back from the layer and applied by hand (about half of it dropped)."""
    import flax.linen as nn

    from adapad_jax.adapters.layer import AdaptedDense

    rate = 0.5
    path, _ = checkpoint("v3", "classification")
    model = load_model(str(path), task="classification", num_labels=3, adapter_dropout=rate)
    slots = _random_slots(model, 2, 0)
    lora = {}
    for t in model.targets:
        lora[t.flax_path + ("a",)], lora[t.flax_path + ("b",)] = slots[t.hf_path]
        lora[t.flax_path + ("coef",)] = np.array([1.5, -0.5], np.float32)
    calls, open_calls = {}, []

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(context.module, AdaptedDense):
            entry = {"x": np.asarray(args[0])}
            open_calls.append(entry)
            out = next_fun(*args, **kwargs)
            open_calls.pop()
            entry["y"] = np.asarray(out)
            calls.setdefault(tuple(context.module.scope.path), []).append(entry)
            return out
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and open_calls:
            open_calls[-1]["x_in"] = np.asarray(out)
        return out

    with nn.intercept_methods(record):
        model.module.apply({"params": model.params, "lora": traverse_util.unflatten_dict(lora)}, **_batch("v3", 8),
                           deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert set(calls) == {t.flax_path for t in model.targets}
    params = traverse_util.flatten_dict(model.params)
    dropped = []
    for t in model.targets:
        kernel = np.asarray(params[t.flax_path + ("kernel",)], np.float64)
        bias = np.asarray(params[t.flax_path + ("bias",)], np.float64)
        a, b = (np.asarray(v, np.float64) for v in slots[t.hf_path])
        for call in calls[t.flax_path]:
            x = call["x"].astype(np.float64)
            mask = call["x_in"] != 0
            np.testing.assert_allclose(call["x_in"], np.where(mask, x / (1 - rate), 0.0), rtol=1e-5, atol=1e-6)
            dropped.append(1.0 - mask[x != 0].mean())
            delta = ((np.where(mask, x, 0.0) / (1 - rate)) @ a.T * np.array([1.5, -0.5])) @ b
            want = x @ kernel + bias + delta
            np.testing.assert_allclose(call["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            undropped = want - delta + (x @ a.T * np.array([1.5, -0.5])) @ b
            assert np.abs(call["y"] - undropped).max() > 1e-3, t.hf_path
    assert 0.4 < np.mean(dropped) < 0.6 and min(dropped) > 0.2, dropped


def test_bf16_compute_close_to_fp32(checkpoint):
    path, _ = checkpoint("v3", "qa")
    fp32 = load_model(str(path), task="qa")
    bf16 = load_model(str(path), task="qa", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
    batch = _batch("v3", 64)
    ref = jax.jit(fp32.module.apply)({"params": fp32.params}, **batch)
    low = jax.jit(bf16.module.apply)({"params": bf16.params}, **batch)
    assert all(v.dtype == jnp.float32 for v in low.values())
    for name in ref:
        error = np.abs(np.asarray(low[name]) - np.asarray(ref[name]))
        assert 0 < error.max() <= BF16_MAX_REL_TOL * float(jnp.abs(ref[name]).max()), name
        assert error.mean() <= BF16_MEAN_REL_TOL * float(jnp.abs(ref[name]).max()), name


@pytest.mark.parametrize("config_name", ["v3", "no_relative"])
def test_layer_remat_gives_the_same_outputs_and_adapter_gradients(checkpoint, config_name):
    """Layer-wise remat (adapter.remat) recomputes each encoder layer: same loss and adapter gradients."""
    path, _ = checkpoint(config_name, "qa")
    checkpoint_dir, hf_config = load_hf_config(str(path))
    plain = deberta.load(checkpoint_dir, hf_config, task="qa", adapter_dropout=0.1)
    remat = dataclasses.replace(plain, module=with_layer_remat(plain.module))  # adapter.remat's route
    assert remat.module.remat and not plain.module.remat
    slots = _random_slots(plain, 2, seed=4)
    lora = {}
    for t in plain.targets:
        lora[t.flax_path + ("a",)], lora[t.flax_path + ("b",)] = slots[t.hf_path]
        lora[t.flax_path + ("coef",)] = np.ones(2, np.float32)
    lora = traverse_util.unflatten_dict(lora)
    batch = _batch(config_name, 12, seed=3)

    def loss_of(loaded):
        def loss(lora):
            out = loaded.module.apply({"params": loaded.params, "lora": lora}, **batch, deterministic=False,
                                      rngs={"dropout": jax.random.PRNGKey(0)})
            return jnp.sum(out["start_logits"] ** 2) + jnp.sum(jnp.tanh(out["end_logits"]))

        return jax.jit(jax.value_and_grad(loss))

    value_plain, grad_plain = loss_of(plain)(lora)
    value_remat, grad_remat = loss_of(remat)(lora)
    np.testing.assert_allclose(float(value_remat), float(value_plain), rtol=1e-5)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_plain))
    assert largest > 0
    for g1, g2 in zip(jax.tree.leaves(grad_plain), jax.tree.leaves(grad_remat)):
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-4, atol=1e-5 * largest)
