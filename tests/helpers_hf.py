"""Tiny random transformers checkpoints in temp dirs, and torch references, for model and export tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TINY_DEBERTA = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=128,
    relative_attention=True,
    position_buckets=8,
    max_relative_positions=-1,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=0,
    layer_norm_eps=1e-7,
    hidden_act="gelu",
    pad_token_id=0,
    # Larger than DeBERTa's 0.02 so logits and attention patterns are far from trivial in a tiny model.
    initializer_range=0.3,
)

TORCH_CLASSES = {
    "classification": "DebertaV2ForSequenceClassification",
    "regression": "DebertaV2ForSequenceClassification",
    "qa": "DebertaV2ForQuestionAnswering",
}


def tiny_deberta_config(task: str = "classification", num_labels: int = 3, **overrides: Any):
    """A DebertaV2Config shaped like DeBERTaV3 but tiny; ``overrides`` replace fields."""
    from transformers import DebertaV2Config

    fields = {**TINY_DEBERTA, **overrides}
    if task == "qa":
        fields["num_labels"] = 2
    elif task == "regression":
        fields["num_labels"] = 1
        fields["problem_type"] = "regression"
    else:
        fields["num_labels"] = num_labels
    return DebertaV2Config(**fields)


def torch_deberta(config, task: str, seed: int = 0):
    """A randomly initialised transformers DeBERTa for ``task`` in eval mode (seeded)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, TORCH_CLASSES[task])(config)
    # Random non-trivial LayerNorm and bias values so a mapping error cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_torch_model(model, directory: Path) -> Path:
    """``save_pretrained`` (safetensors) into ``directory``."""
    model.save_pretrained(str(directory))
    return directory


def write_deberta_v3_base_layout(directory: Path, seed: int = 0, **overrides: Any) -> dict[str, np.ndarray]:
    """A checkpoint laid out like ``microsoft/deberta-v3-base``: old-style config.json and an MLM pytorch_model.bin.

    The config has ``pos_att_type`` as the string ``"p2c|c2p"``, no ``architectures``; the weights are a
    backbone under ``deberta.`` plus ``lm_predictions.*`` and ``mask_predictions.*`` pretraining heads.
    Returns the written tensors as numpy.
    """
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    fields = {**TINY_DEBERTA, **overrides}
    raw_config = {
        "model_type": "deberta-v2",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": fields["hidden_act"],
        "hidden_dropout_prob": 0.1,
        "hidden_size": fields["hidden_size"],
        "initializer_range": fields["initializer_range"],
        "intermediate_size": fields["intermediate_size"],
        "max_position_embeddings": fields["max_position_embeddings"],
        "relative_attention": True,
        "position_buckets": fields["position_buckets"],
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "pos_att_type": "p2c|c2p",
        "layer_norm_eps": 1e-7,
        "max_relative_positions": -1,
        "position_biased_input": False,
        "num_attention_heads": fields["num_attention_heads"],
        "num_hidden_layers": fields["num_hidden_layers"],
        "type_vocab_size": 0,
        "vocab_size": fields["vocab_size"],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw_config, indent=2))
    torch.manual_seed(seed)
    backbone = DebertaV2Model(DebertaV2Config(**raw_config))
    state = {f"deberta.{k}": v.detach().clone() for k, v in backbone.state_dict().items()}
    for name in list(state):
        if name.endswith("bias") or "LayerNorm" in name:
            state[name] = state[name] + 0.1 * torch.randn_like(state[name])
    hidden, vocab = raw_config["hidden_size"], raw_config["vocab_size"]
    state.update(
        {
            "lm_predictions.lm_head.dense.weight": torch.randn(hidden, hidden),
            "lm_predictions.lm_head.dense.bias": torch.randn(hidden),
            "lm_predictions.lm_head.LayerNorm.weight": torch.randn(hidden),
            "lm_predictions.lm_head.LayerNorm.bias": torch.randn(hidden),
            "lm_predictions.lm_head.bias": torch.randn(vocab),
            "mask_predictions.dense.weight": torch.randn(hidden, hidden),
            "mask_predictions.dense.bias": torch.randn(hidden),
            "mask_predictions.LayerNorm.weight": torch.randn(hidden),
            "mask_predictions.LayerNorm.bias": torch.randn(hidden),
            "mask_predictions.classifier.weight": torch.randn(1, hidden),
            "mask_predictions.classifier.bias": torch.randn(1),
        }
    )
    torch.save(state, directory / "pytorch_model.bin")
    return {k: v.numpy() for k, v in state.items()}


def padded_batch(
    batch: int, seq_len: int, vocab_size: int, seed: int = 0, type_vocab_size: int = 0
) -> dict[str, np.ndarray]:
    """Random ids with right padding: row lengths seq_len, then shorter, the last row length 1."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(seq_len, 1, batch).round().astype(int)
    ids = rng.integers(1, vocab_size, size=(batch, seq_len)).astype(np.int32)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    out = {"input_ids": np.where(mask == 1, ids, 0).astype(np.int32), "attention_mask": mask}
    if type_vocab_size > 0:
        out["token_type_ids"] = (rng.integers(0, type_vocab_size, size=(batch, seq_len)) * mask).astype(np.int32)
    return out


def torch_outputs(model, batch: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """Run a transformers (or PEFT-wrapped) model on a numpy batch; logits as numpy float32."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v).long() for k, v in batch.items()})
    if task == "qa":
        return {"start_logits": out.start_logits.float().numpy(), "end_logits": out.end_logits.float().numpy()}
    return {"logits": out.logits.float().numpy()}


def max_abs_diff(ours: dict[str, Any], reference: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over the output arrays both dicts share (keys must be the same)."""
    assert set(ours) == set(reference), (sorted(ours), sorted(reference))
    return max(float(np.max(np.abs(np.asarray(ours[k], np.float64) - reference[k]))) for k in reference)


def hf_batch(rng: np.random.Generator, task: str, size: int = 8, seq: int = 16) -> dict[str, np.ndarray]:
    """A random batch for a tiny checkpoint: ids, a mask with row 0 half padded, weights and task labels."""
    ids = rng.integers(5, 300, size=(size, seq)).astype(np.int32)
    mask = np.ones((size, seq), np.int32)
    mask[0, seq // 2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "example_weight": np.ones(size, np.float32)}
    if task == "classification":
        batch["labels"] = rng.integers(0, 3, size=size).astype(np.int32)
    else:
        batch["start_positions"] = rng.integers(0, seq // 2, size=size).astype(np.int32)
        batch["end_positions"] = rng.integers(0, seq // 2, size=size).astype(np.int32)
    return batch


def assert_peft_reproduces_predict(trainer: Any, checkpoint: Path, adapter_dir: Path, batch: dict[str, np.ndarray],
                                   task: str) -> Any:
    """``peft.PeftModel.from_pretrained`` on the transformers model of ``checkpoint`` with ``adapter_dir`` gives
    ``trainer.predict``'s outputs (rtol 1e-4, atol 1e-5), which differ from the base model's; returns the PEFT
    model."""
    from reference_libs import import_reference

    torch = import_reference("torch")
    peft = import_reference("peft")
    import transformers

    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "qa": transformers.AutoModelForQuestionAnswering}[task]
    base = auto.from_pretrained(str(checkpoint))
    with torch.no_grad():
        inputs = {k: torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask")}
        base_out = base(**inputs)
        peft_model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        peft_out = peft_model(**inputs)
    ours = trainer.predict(batch)
    for key in ours:
        np.testing.assert_allclose(ours[key], peft_out[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
        assert np.abs(ours[key] - base_out[key].numpy()).max() > 1e-4, "training should have changed the model"
    return peft_model
