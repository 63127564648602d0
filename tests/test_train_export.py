"""Trainer on real model ports: a few adapad steps on a (2, 2) mesh, export, and PEFT reproduces predict()."""

import numpy as np
import pytest
from reference_libs import import_reference

from adapad_jax.run.core import export_trainer
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import enable_compilation_cache, toy_config

enable_compilation_cache()


def _batch(rng, task, size=8, seq=16):
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


@pytest.mark.slow
@pytest.mark.parametrize("family,task", [("deberta", "classification"), ("qwen3", "qa")])
def test_trained_adapter_exports_to_peft(tmp_path, family, task):
    torch = import_reference("torch")
    peft = import_reference("peft")
    import transformers

    from adapad_jax.models.registry import load_model
    from adapad_jax.testing.tiny import build_tiny_deberta, build_tiny_qwen3

    build = build_tiny_deberta if family == "deberta" else build_tiny_qwen3
    num_labels = 3 if task == "classification" else 2
    path = build(tmp_path / "ckpt", task=task, num_labels=num_labels)
    model = load_model(str(path), task=task, num_labels=num_labels)
    cfg = toy_config(**{"adapter.r_max": 4, "adapter.rank_budget": len(model.targets) + 4, "adapter.top_k": 2,
                        "adapter.growth_interval": 2, "adapter.init_std": 0.05, "optim.learning_rate": 5e-2,
                        "model.name_or_path": str(path), "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(2, 2), tmp_path / "out")
    trainer.restore_or_init({})
    rng = np.random.default_rng(0)
    trainer.train(iter([_batch(rng, task) for _ in range(5)]), 5, lambda: {}, progress=False)
    assert sum(trainer.ranks().values()) > len(model.targets)
    out = export_trainer(trainer, tmp_path / "export")

    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "qa": transformers.AutoModelForQuestionAnswering}[task]
    base = auto.from_pretrained(str(path))
    batch = _batch(rng, task, size=5)
    with torch.no_grad():
        inputs = {k: torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask")}
        base_out = base(**inputs)
        peft_model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        peft_out = peft_model(**inputs)
    ours = trainer.predict(batch)
    for key in ours:
        np.testing.assert_allclose(ours[key], peft_out[key].numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(ours[key] - base_out[key].numpy()).max() > 1e-4, "training should have changed the model"
    trainer.close()
