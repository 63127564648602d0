"""PEFT adapter and merged-checkpoint export of a DeBERTa with committed slots, checked with peft and transformers."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from reference_libs import import_reference
from flax import traverse_util

from adapad_jax.models.export import factors_in_target_order, write_merged_checkpoint, write_peft_adapter
from adapad_jax.models.registry import load_model
from helpers_hf import max_abs_diff, padded_batch, save_torch_model, tiny_deberta_config, torch_deberta, torch_outputs

torch = import_reference("torch")
peft = import_reference("peft")

PARITY_TOL = 1e-4
R_MAX = 4
SCALING = 0.75  # s = alpha / r_max in AdaPaD
CASES = {
    # share_att_key: the adapted query_proj/key_proj also act on the relative position embeddings.
    "v3-classification": ("classification", {}, None),
    # separate pos_key_proj/pos_query_proj (adapted too), token types, embedding projection.
    "v2-qa": (
        "qa",
        dict(share_att_key=False, pos_att_type=["c2p", "p2c"], position_biased_input=True, type_vocab_size=2,
             embedding_size=24, norm_rel_ebd="none"),
        ["query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj", "dense"],
    ),
    "v3-regression": ("regression", dict(num_hidden_layers=1), ["value_proj", "output.dense"]),
}


def _auto_class(task: str):
    import transformers

    return (transformers.AutoModelForQuestionAnswering if task == "qa"
            else transformers.AutoModelForSequenceClassification)


def _trained_state(model, seed: int):
    """A stand-in for a trained run: perturbed head, slot factors with per-module committed ranks 0..R_MAX."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, model.params)
    for prefix in model.head_prefixes:
        node = params
        for key in prefix:
            node = node[key]
        for leaf, value in traverse_util.flatten_dict(node).items():
            sub = node
            for key in leaf[:-1]:
                sub = sub[key]
            sub[leaf[-1]] = value + rng.normal(0, 0.2, value.shape).astype(np.float32)
    ranks = [(i * 3 + 1) % (R_MAX + 1) for i in range(len(model.targets))]  # includes 0 (excluded) and R_MAX
    lora, factors = {}, {}
    for target, r in zip(model.targets, ranks):
        a = rng.normal(0, 0.3, (R_MAX, target.in_features)).astype(np.float32)
        b = rng.normal(0, 0.3, (R_MAX, target.out_features)).astype(np.float32)
        committed = np.zeros(R_MAX, bool)
        committed[rng.permutation(R_MAX)[:r]] = True  # committed slots need not be a prefix
        lora[target.flax_path + ("a",)] = a
        lora[target.flax_path + ("b",)] = b
        lora[target.flax_path + ("coef",)] = (SCALING * committed).astype(np.float32)
        factors[target.hf_path] = (a[committed], b[committed].T)
    return params, traverse_util.unflatten_dict(lora), factors


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    task, overrides, target_names = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    save_torch_model(torch_deberta(tiny_deberta_config(task, **overrides), task, seed=3), root / "base")
    model = load_model(str(root / "base"), task=task, num_labels=3, target_names=target_names)
    params, lora, factors = _trained_state(model, seed=4)
    batch = padded_batch(3, 19, 64, seed=5, type_vocab_size=model.hf_config.type_vocab_size)
    ours = jax.jit(model.module.apply)({"params": params, "lora": lora}, **batch)
    adapter_dir = write_peft_adapter(root / "adapter", model, params, factors, SCALING, str(root / "base"))
    merged_dir = write_merged_checkpoint(root / "merged", model, params, factors, SCALING)
    return dict(task=task, root=root, model=model, params=params, factors=factors, batch=batch, ours=ours,
                adapter_dir=adapter_dir, merged_dir=merged_dir)


def test_peft_adapter_reproduces_our_logits(exported):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    task = exported["task"]
    base = _auto_class(task).from_pretrained(str(exported["root"] / "base"))
    plain = torch_outputs(base, exported["batch"], task)
    peft_model = PeftModel.from_pretrained(base, str(exported["adapter_dir"])).eval()
    if task == "qa" and "token_type_ids" in exported["batch"]:
        # peft 0.21's PeftModelForQuestionAnswering.forward drops token_type_ids for LoRA; run the LoRA-injected
        # transformers model underneath it instead (same weights, same wrapped modules).
        reference = torch_outputs(peft_model.get_base_model(), exported["batch"], task)
    else:
        reference = torch_outputs(peft_model, exported["batch"], task)
    assert max_abs_diff(exported["ours"], reference) <= PARITY_TOL
    assert max_abs_diff(exported["ours"], plain) > 1e-2, "adapters and head should change the logits"

    wrapped = {
        name.removeprefix("base_model.model."): module.lora_A["default"].weight.shape[0]
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    expected = {path: a.shape[0] for path, (a, _) in exported["factors"].items() if a.shape[0] > 0}
    assert wrapped == expected
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            r = module.lora_A["default"].weight.shape[0]
            assert module.scaling["default"] == pytest.approx(SCALING), name
            assert r == expected[name.removeprefix("base_model.model.")]


def test_adapter_config_patterns_each_match_exactly_one_module(exported):
    config = json.loads((exported["adapter_dir"] / "adapter_config.json").read_text())
    model = exported["model"]
    torch_model = _auto_class(exported["task"]).from_pretrained(str(exported["merged_dir"]))
    module_names = [name for name, _ in torch_model.named_modules() if name]
    for pattern in list(config["rank_pattern"]) + list(config["alpha_pattern"]):
        hits = [n for n in module_names if re.match(rf"(.*\.)?({pattern})$", n)]
        assert len(hits) == 1, (pattern, hits)
    ranks = {p: a.shape[0] for p, (a, _) in exported["factors"].items()}
    assert config["rank_pattern"] == {re.escape(p): r for p, r in ranks.items() if r > 0}
    for key, r in config["rank_pattern"].items():
        assert config["alpha_pattern"][key] / r == pytest.approx(SCALING)
    assert sorted(config["exclude_modules"] or []) == sorted(p for p, r in ranks.items() if r == 0)
    assert config["task_type"] == {"qa": "QUESTION_ANS"}.get(exported["task"], "SEQ_CLS")
    assert set(config["modules_to_save"]) == set(model.modules_to_save)
    assert ("pooler" in config["modules_to_save"]) == (exported["task"] != "qa")


def test_merged_checkpoint_loads_in_plain_transformers(exported, tmp_path):
    task, model = exported["task"], exported["model"]
    # A bf16 source config must not make transformers load the fp32 merged weights as bf16.
    bf16_config = copy.deepcopy(model.hf_config)
    bf16_config.dtype = "bfloat16"
    merged_dir = write_merged_checkpoint(tmp_path, dataclasses.replace(model, hf_config=bf16_config),
                                         exported["params"], exported["factors"], SCALING)
    merged, info = _auto_class(task).from_pretrained(str(merged_dir), output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert merged.dtype == torch.float32
    assert merged.config.num_labels == model.hf_config.num_labels
    assert merged.config.architectures == [model.hf_architecture]
    reference = torch_outputs(merged.eval(), exported["batch"], task)
    assert max_abs_diff(exported["ours"], reference) <= PARITY_TOL


def test_peft_save_layout_matches_ours(exported, tmp_path):
    """Key names and shapes of our adapter file == those of peft's own save_pretrained for the same setup."""
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file

    config = json.loads((exported["adapter_dir"] / "adapter_config.json").read_text())
    base = _auto_class(exported["task"]).from_pretrained(str(exported["root"] / "base"))
    peft_config = LoraConfig(
        task_type=config["task_type"], r=config["r"], lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"], rank_pattern=config["rank_pattern"],
        alpha_pattern=config["alpha_pattern"], modules_to_save=config["modules_to_save"],
    )
    get_peft_model(base, peft_config).save_pretrained(str(tmp_path))
    theirs = {k: v.shape for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    ours = {k: v.shape for k, v in load_file(str(exported["adapter_dir"] / "adapter_model.safetensors")).items()}
    assert ours == theirs


def test_bad_factors_are_refused(exported, tmp_path):
    model, params = exported["model"], exported["params"]
    target = model.targets[0]
    with pytest.raises(ValueError, match="not adapter targets"):
        write_peft_adapter(tmp_path, model, params, {"deberta.nope": (np.zeros((1, 2)), np.zeros((2, 1)))}, 1.0, "x")
    wrong = {target.hf_path: (np.zeros((2, target.in_features + 1)), np.zeros((target.out_features, 2)))}
    with pytest.raises(ValueError, match="do not fit the layer"):
        write_merged_checkpoint(tmp_path, model, params, wrong, 1.0)
    transposed = {target.hf_path: (np.zeros((2, target.in_features)), np.zeros((2, target.out_features)))}
    with pytest.raises(ValueError, match=r"need A \[r, in\] and B \[out, r\]"):
        write_peft_adapter(tmp_path, model, params, transposed, 1.0, "x")
    empty = {target.hf_path: (np.zeros((0, target.in_features)), np.zeros((target.out_features, 0)))}
    with pytest.raises(ValueError, match="no adapter target has a committed slot"):
        write_peft_adapter(tmp_path, model, params, empty, 1.0, "x")
    assert factors_in_target_order(model, empty) == []


def test_model_card_states_the_reachable_budget():
    # The run: 12 adapted modules, r_max 4, budget 144 -> only 12 x 4 = 48 can ever be committed.
    from adapad_jax.config.schema import base_config
    from adapad_jax.outputs.model_card import model_card

    config = base_config()
    config.task, config.adapter.rank_budget, config.adapter.r_max = "glue_rte", 144, 4
    ranks = {f"deberta.encoder.layer.{layer}.attention.self.{m}": 2 for layer in range(2)
             for m in ("query_proj", "key_proj", "value_proj", "q", "k", "v")}
    card = str(model_card(config, ranks, {"accuracy": 0.5}, step=10, reachable_budget=48))
    assert "global rank budget 144, of which 48 is reachable (12 modules x r_max 4" in card
    config.adapter.rank_budget = 40  # below 48: the budget itself is what binds
    assert "global rank budget 40, at most 4 per module" in str(model_card(config, ranks, {}, step=10,
                                                                            reachable_budget=40))
    config.adapter.rank_budget = 144  # a run that does not grow states no reachable part
    assert "global rank budget 144, at most 4 per module" in str(model_card(config, ranks, {}, step=10,
                                                                             reachable_budget=None))
