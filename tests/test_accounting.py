"""Budget and accounting (issue 20): the adapter parameter counts of every run and ``adapter.param_budget``.

Every expected number is hand-computed from the module shapes: a rank costs in + out factor parameters.
The toy model (``testing.toy.make_toy_model(hidden=16)``) adapts 4 modules, 16 -> 32 and 32 -> 16 in each of two
layers, so every rank costs 48; its head is Dense(16 -> 8): 16 x 8 + 8 = 136 parameters.
The config-only DeBERTaV3 checkpoint (hidden 32, intermediate 48, 3 layers) adapts 18 modules: per layer
query / key / value / attention output 32 + 32 = 64 each and intermediate / output 32 + 48 = 80 each, so
sum(in + out) = 3 x (4 x 64 + 2 x 80) = 1,248 and the mean is 1,248 / 18.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.adapters.target import AdapterTarget
from adapad_jax.config import validation
from adapad_jax.run import checks
from adapad_jax.config.schema import ConfigError, base_config
from adapad_jax.methods.base import Method, MethodSetup
from adapad_jax.testing.toy import ToyBatches, make_toy_model, planted_teacher, toy_config

TOY_RANK_COST = 16 + 32
TOY_HEAD = 16 * 8 + 8


def _trainer(tmp_path: Path, **overrides: Any):
    from adapad_jax.training import Trainer, make_mesh

    model = make_toy_model(hidden=16)
    trainer = Trainer(model, toy_config(**overrides), make_mesh(1, 1), tmp_path)
    trainer.restore_or_init({})
    return model, trainer


# ------------------------------------------------------------------------------ counts on the toy model


@pytest.mark.parametrize("method, factors, reserves", [
    # adapad / joint start at rank 1 in each of the 4 modules, each with one reserve slot that trains (advance
    # learning); lora trains lora_rank 2 everywhere and keeps no reserve.
    ("adapad", 4 * 1 * TOY_RANK_COST, 4 * TOY_RANK_COST),
    ("joint", 4 * 1 * TOY_RANK_COST, 4 * TOY_RANK_COST),
    ("lora", 4 * 2 * TOY_RANK_COST, 0),
])
def test_counts_at_init_are_the_hand_computed_ones(tmp_path, method, factors, reserves):
    _, trainer = _trainer(tmp_path, **{"adapter.method": method})
    counts = trainer.accounting()
    assert counts == {
        "factors": factors, "with_extras": factors, "with_reserves": factors + reserves, "head": TOY_HEAD,
        "paper": factors, "paper_count": "factors: committed rank x (in + out) per module", "param_budget": 0,
    }


@pytest.mark.parametrize("method, budget, total_rank, reserves", [
    # T = 5: one growth after step 10 promotes top_k = 2 modules, total rank 4 -> 6. With budget 8 left over, each
    # of the 4 modules (all below r_max 4) keeps a reserve; at budget 6 none is kept (allocator.masks_from_rank).
    ("adapad", 8, 6, 4),
    ("joint", 6, 6, 0),
])
def test_counts_follow_growth_and_the_reserves_a_run_keeps(tmp_path, method, budget, total_rank, reserves):
    model, trainer = _trainer(tmp_path, **{"adapter.method": method, "adapter.rank_budget": budget})
    batches = ToyBatches(model, planted_teacher(model, [2, 1, 1, 0]), batch_size=16)
    trainer.train(batches, 10, data_state_fn=batches.state, progress=False)
    assert sum(trainer.ranks().values()) == total_rank
    counts = trainer.accounting()
    assert counts["factors"] == counts["with_extras"] == counts["paper"] == total_rank * TOY_RANK_COST
    assert counts["with_reserves"] == (total_rank + reserves) * TOY_RANK_COST
    assert counts["head"] == TOY_HEAD


# ------------------------------------------------------------------------ a method of its own, generically


class TripletMethod(Method):
    """A made-up method: a singular value per rank and a scale per module (extras), one reserve row where the
    budget allows (live, not committed), and a paper that counts in + out + 1 per committed rank."""

    name = "triplet_test"
    paper_count = "in + out + 1 per committed rank"

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        return MethodSetup(num_modules, 3, 1.0, 1, 6, True, True)

    def init_alloc(self):
        raise NotImplementedError

    def live_mask(self, alloc, method_state):
        return alloc["committed"] | alloc["reserve"]

    def extra_parameters(self, ranks):
        return sum(ranks.values()) + len(ranks)

    def paper_parameters(self, counts, trainable, alloc, method_state):
        return counts["factors"] + int(np.asarray(alloc["rank"]).sum())


def test_a_method_subclass_gets_every_count_from_its_hooks():
    targets = [AdapterTarget("m.0", ("m0",), 8, 16), AdapterTarget("m.1", ("m1",), 16, 8),
               AdapterTarget("m.2", ("m2",), 8, 8)]
    method = TripletMethod(base_config().adapter, targets)
    committed = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], bool)
    reserve = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], bool)
    alloc = {"committed": committed, "reserve": reserve, "rank": committed.sum(1).astype(np.int32)}
    trainable = {"head": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}
    counts = method.accounting(trainable, alloc, {})
    factors = 2 * 24 + 0 * 24 + 1 * 16  # ranks 2, 0, 1; in + out 24, 24, 16
    rows = 2 * 24 + 1 * 24 + 2 * 16  # plus the reserves of modules 1 and 2
    assert counts == {
        "factors": factors,
        "with_extras": factors + 3 + 3,  # a singular value per rank (3) and a scale per module (3)
        "with_reserves": rows + 5 + 3,  # ... of every row that trains (5 rows)
        "head": 3 * 2 + 2,
        "paper": factors + 3,
        "paper_count": "in + out + 1 per committed rank",
    }


# -------------------------------------------------------------------- adapter.param_budget -> a rank budget


DEBERTA_BASE_WIDTHS = [768 + 768] * 48 + [768 + 3072] * 24  # 12 layers x (q, k, v, o; intermediate, output)


@pytest.mark.parametrize("param_budget, method, value", [
    (331_776, "adapad", 144),  # 144 x mean 2,304: Table 3's uniform rank 2 over 72 modules (0.332M)
    (331_775, "adapad", 143),  # one parameter short: the largest total rank that fits is one less
    (331_776 + 2_303, "joint", 144),
    (331_776, "lora", 2),  # rank 2 in each of 72 modules costs 2 x 165,888
    (331_775, "lora", 1),
    (165_888, "adalora", 72),  # any method with a slot axis reads rank_budget
])
def test_param_budget_converts_to_the_largest_rank_budget_that_fits_uniformly(param_budget, method, value):
    assert validation.budget_from_params(param_budget, DEBERTA_BASE_WIDTHS, method) == value
    assert validation.budget_field(method) == ("lora_rank" if method == "lora" else "rank_budget")


@pytest.mark.parametrize("param_budget, method, initial_rank, message", [
    (165_887, "adapad", 1, "adapter.param_budget=165887 is below 72 adapted modules x adapter.initial_rank=1 (sum "
                           "of in + out 165888): give at least 165888"),
    (331_775, "joint", 2, "adapter.param_budget=331775 is below 72 adapted modules x adapter.initial_rank=2 (sum "
                          "of in + out 165888): give at least 331776"),
    (100, "lora", 1, "adapter.param_budget=100 is below rank 1 in each of the 72 adapted modules (sum of in + out "
                     "165888): give at least 165888"),
])
def test_a_param_budget_below_every_module_s_first_rank_is_one_line(param_budget, method, initial_rank, message):
    with pytest.raises(ConfigError) as err:
        validation.budget_from_params(param_budget, DEBERTA_BASE_WIDTHS, method, initial_rank)
    assert str(err.value) == message


def test_the_trainer_builds_the_method_with_the_converted_budget(tmp_path):
    # 4 toy modules of in + out 48: 6 ranks x 48 = 288 fits, 289..335 still give 6, lora: 2 x 192 = 384 <= 400.
    _, trainer = _trainer(tmp_path / "a", **{"adapter.param_budget": 300})
    assert trainer.rank_budget == 6 and trainer.settings.rank_budget == 6
    assert trainer.budget_conversion == {"param_budget": 300, "field": "adapter.rank_budget", "value": 6,
                                         "modules": 4, "mean_width": 48.0}
    counts = trainer.accounting()
    assert counts["param_budget"] == 300 and counts["converted_to"] == {"adapter.rank_budget": 6}
    _, lora = _trainer(tmp_path / "b", **{"adapter.method": "lora", "adapter.param_budget": 400,
                                          "adapter.lora_rank": 7})
    assert lora.settings.lora_rank == 2 and lora.accounting()["factors"] == 4 * 2 * TOY_RANK_COST


def _checkpoint_config(directory: Path) -> str:
    import transformers

    transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        type_vocab_size=0,
    ).save_pretrained(str(directory))
    return str(directory)


def _config(tmp_path: Path, **adapter: Any):
    config = base_config()
    config.task = "glue_sst2"
    config.output_dir = str(tmp_path / "out")
    config.model.name_or_path = _checkpoint_config(tmp_path / "ckpt")
    for key, value in adapter.items():
        config.adapter[key] = value
    return config


def test_the_tiny_checkpoint_widths_are_the_hand_computed_ones(tmp_path):
    widths = checks.adapter_target_widths(_config(tmp_path))
    assert sorted(widths) == [64] * 12 + [80] * 6 and sum(widths) == 1248


def test_validation_checks_the_converted_budget_before_any_compute(tmp_path):
    config = _config(tmp_path, param_budget=2 * 1248, rank_budget=1)  # rank_budget 1 alone would be refused
    checks.check_model(config, "classification")
    config.adapter.param_budget = 1247  # 17 ranks over 18 modules
    with pytest.raises(ConfigError) as err:
        checks.check_model(config, "classification")
    assert str(err.value) == ("adapter.param_budget=1247 is below 18 adapted modules x adapter.initial_rank=1 (sum "
                              "of in + out 1248): give at least 1248")
    config.adapter.param_budget = -1
    with pytest.raises(ConfigError, match="^adapter.param_budget=-1 must be >= 0$"):
        validation.check_fields(config)


def test_a_rank_budget_and_a_param_budget_that_disagree_are_refused_in_one_line(tmp_path):
    config = _config(tmp_path, param_budget=2 * 1248, rank_budget=36)  # 2,496 x 18 / 1,248 = 36: they agree
    checks.check_budget_overrides(config, ["adapter.param_budget", "adapter.rank_budget"])
    config.adapter.rank_budget = 40
    checks.check_budget_overrides(config, ["adapter.param_budget"])  # the config file's rank_budget gives way
    with pytest.raises(ConfigError) as err:
        checks.check_budget_overrides(config, ["adapter.param_budget", "adapter.rank_budget"])
    assert str(err.value) == ("adapter.rank_budget=40 and adapter.param_budget=2496, which converts to "
                              "adapter.rank_budget=36 for this model, are both given: give one of them")
    config.adapter.method, config.adapter.lora_rank = "lora", 3
    with pytest.raises(ConfigError, match="^adapter.lora_rank=3 and adapter.param_budget=2496, which converts to "
                                          "adapter.lora_rank=2 for this model, are both given"):
        checks.check_budget_overrides(config, ["adapter.lora_rank"])


def test_the_train_command_refuses_disagreeing_budgets_before_loading_anything(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    args = [sys.executable, str(repo / "launch" / "train.py"), "--config", str(repo / "configs" / "glue_cola.py"),
            f"--config.output_dir={out}", f"--config.model.name_or_path={_checkpoint_config(tmp_path / 'ckpt')}",
            "--config.adapter.param_budget=2496", "--config.adapter.rank_budget=40"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=str(repo),
                            env={**os.environ, "PYTHONPATH": str(repo)})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].endswith("adapter.rank_budget=40 and adapter.param_budget=2496, which converts to "
                              "adapter.rank_budget=36 for this model, are both given: give one of them"), lines
    assert not out.exists()
