"""Trainer on real model ports: a few adapad steps on a (2, 2) mesh, export, and PEFT reproduces predict()."""

import numpy as np
import pytest

from helpers_hf import assert_peft_reproduces_predict, hf_batch
from adapad_jax.run.core import export_trainer
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import enable_compilation_cache, toy_config

enable_compilation_cache()



@pytest.mark.slow
@pytest.mark.parametrize("family,task", [("deberta", "classification"), ("qwen3", "qa")])
def test_trained_adapter_exports_to_peft(tmp_path, family, task):

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
    trainer.train(iter([hf_batch(rng, task) for _ in range(5)]), 5, lambda: {}, progress=False)
    assert sum(trainer.ranks().values()) > len(model.targets)
    out = export_trainer(trainer, tmp_path / "export")

    assert_peft_reproduces_predict(trainer, path, out / "adapter", hf_batch(rng, task, size=5), task)
    trainer.close()
