"""Planted low-rank teacher: training lowers the loss and planted modules receive more rank; outputs."""

import json

import numpy as np
import pytest

from adapad_jax.run.core import export_trainer
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.losses import loss_terms
from adapad_jax.outputs.rank_outputs import layer_and_type, rank_grid
from adapad_jax.testing.toy import (ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher,
                                     toy_batch, toy_config)

enable_compilation_cache()


@pytest.mark.parametrize("planted", [(3, 2, 0, 0), (0, 3, 0, 2)])
def test_planted_modules_receive_more_rank(tmp_path, planted):
    model = make_toy_model(hidden=16, num_layers=2, layout="branches")
    teacher = planted_teacher(model, planted, scale=1.0)
    cfg = toy_config(**{"adapter.r_max": 4, "adapter.rank_budget": 9, "adapter.top_k": 1,
                        "adapter.growth_interval": 5, "adapter.alpha": 4.0, "adapter.init_std": 0.1,
                        "optim.learning_rate": 1e-2, "optim.warmup_steps": 5, "checkpoint.every_steps": 0,
                        "train.log_every_steps": 10})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path)
    data = ToyBatches(model, teacher, 32)
    trainer.restore_or_init(data.state())
    held_out = [toy_batch(model, teacher, 10_000 + i, 64, seed=1) for i in range(4)]

    def eval_loss():
        return np.mean([np.divide(*loss_terms("regression", trainer.predict(b), b)) for b in held_out])

    before = eval_loss()
    trainer.train(data, 40, data.state, progress=False)
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
    ranks = trainer.ranks()
    assert sum(ranks.values()) == 9
    rank_list = [ranks[t.hf_path] for t in model.targets]
    planted_ranks = [r for r, p in zip(rank_list, planted) if p > 0]
    other_ranks = [r for r, p in zip(rank_list, planted) if p == 0]
    assert min(planted_ranks) > max(other_ranks), dict(zip(planted, rank_list))

    out = export_trainer(trainer, tmp_path / "export")
    assert json.loads((out / "ranks.json").read_text()) == ranks
    assert (out / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid, layers, types = rank_grid(ranks)
    assert layers == [0, 1] and types == ["fc_in", "fc_out"]
    np.testing.assert_array_equal(grid.reshape(-1), rank_list)
    factors = trainer.committed_peft_factors()
    for target, rank in zip(model.targets, rank_list):
        a, b = factors[target.hf_path]
        assert a.shape == (rank, target.in_features) and b.shape == (target.out_features, rank)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    trainer.close()


def test_layer_and_type_parsing():
    assert layer_and_type("deberta.encoder.layer.3.attention.self.query_proj") == (3, "attention.self.query_proj")
    assert layer_and_type("deberta.encoder.layer.11.output.dense") == (11, "output.dense")
    assert layer_and_type("model.layers.27.self_attn.q_proj") == (27, "self_attn.q_proj")
    assert layer_and_type("transformer.layers.0.mlp.down_proj") == (0, "mlp.down_proj")
    assert layer_and_type("classifier") == (-1, "classifier")
