"""Each rule stated once (docs/ARCHITECTURE.md "Who owns each rule"): the rule at its owner, and its callers agreeing."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.config import validation
from adapad_jax.config.schema import METHODS, TASK_NAMES, ConfigError, base_config
from adapad_jax.data.tasks import TASKS
from adapad_jax.models.base import MODEL_TASKS
from adapad_jax.data.task_hooks import REGISTERED
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.training import recovery


def _config(**fields):
    config = base_config()
    config.output_dir = "/tmp/out"
    for dotted, value in fields.items():
        section, leaf = dotted.split(".")
        config[section][leaf] = value
    return config


# ------------------------------------------------------------------ the reachable budget: allocator.rank_capacity


@pytest.mark.parametrize("budget, modules, r_max, capacity", [(100, 3, 4, 12), (10, 3, 4, 10), (12, 3, 4, 12)])
def test_rank_capacity_is_the_budget_or_every_module_at_r_max(budget, modules, r_max, capacity):
    assert alloc_lib.rank_capacity(budget, modules, r_max) == capacity
    state = alloc_lib.init_allocator(modules, r_max, 1, budget)
    assert int(state["budget_left"]) == capacity - modules  # what growth may still spend


def test_a_resumed_budget_above_every_module_at_r_max_leaves_only_the_capacity():
    """recovery.apply_budget_change: 3 modules x r_max 4 = 12 can hold at most 12 whatever the new budget."""
    alloc = alloc_lib.init_allocator(3, 4, 2, 8)  # total rank 6, nothing left
    trainer = types.SimpleNamespace(
        state={"alloc": alloc}, rank_budget=100, num_slots=4, model=types.SimpleNamespace(targets=[0, 1, 2]),
        checkpointer=types.SimpleNamespace(directory="ckpt"), state_shardings=lambda state: None,
    )
    moved = recovery.apply_budget_change(trainer, {"rank_budget": 8}, step=5)["alloc"]
    assert int(moved["budget_left"]) == 12 - 6
    np.testing.assert_array_equal(np.asarray(moved["reserve"]).sum(1), [1, 1, 1])


# -------------------------------------------------------- initial_rank bounds and the budget: validation


@pytest.mark.parametrize("initial_rank, r_max, message", [
    (0, 4, "adapter.initial_rank=0 must be >= 1"),
    (5, 4, "adapter.initial_rank=5 is larger than adapter.r_max=4"),
])
def test_initial_rank_is_between_1_and_r_max(initial_rank, r_max, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        validation.check_initial_rank(initial_rank, r_max)
    validation.check_initial_rank(5, None)  # lora: no slot axis bounds it


@pytest.mark.parametrize("initial_rank", [0, 1, 4, 5])
def test_validation_and_the_allocator_accept_the_same_initial_ranks(initial_rank):
    """The up-front check and init_allocator once disagreed on 0 (the allocator took it); both call the owner now."""
    config = _config(**{"adapter.r_max": 4, "adapter.initial_rank": initial_rank, "adapter.rank_budget": 100})
    outcomes = []
    for check in (lambda: validation.check_fields(config, installed_packages=False),
                  lambda: alloc_lib.init_allocator(4, 4, initial_rank, 100)):
        try:
            check()
            outcomes.append(None)
        except ConfigError as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] is None) == (1 <= initial_rank <= 4)


def test_the_allocator_refuses_a_budget_below_the_initial_ranks_with_the_up_front_message():
    with pytest.raises(ConfigError) as allocator_error:
        alloc_lib.init_allocator(5, 4, 2, 9)
    with pytest.raises(ConfigError) as check_error:
        validation.check_rank_budget(9, 5, 2)
    assert str(allocator_error.value) == str(check_error.value)
    assert "adapter.rank_budget=9 is below the 5 adapted modules x adapter.initial_rank=2 = 10" in str(check_error.value)


# ------------------------------------------------------------------ methods, lora_rank, the slot axis


def test_method_rule_is_the_same_in_validation_and_the_trainer():
    from adapad_jax.training import Trainer

    config = _config(**{"adapter.method": "dora"})
    with pytest.raises(ConfigError) as fields_error:
        validation.check_fields(config, installed_packages=False)
    with pytest.raises(ConfigError) as trainer_error:
        Trainer(None, config, None, "/tmp/unused")  # refused before the model or mesh is looked at
    assert str(fields_error.value) == str(trainer_error.value) == (
        f"adapter.method='dora' is not one of: {', '.join(METHODS)}")


def test_lora_rank_below_1_is_refused_up_front_and_by_the_trainer(tmp_path):
    from adapad_jax.testing.toy import make_toy_model, toy_config
    from adapad_jax.training import Trainer, make_mesh

    with pytest.raises(ConfigError, match=r"^adapter.lora_rank=0 must be >= 1$"):
        validation.check_fields(_config(**{"adapter.lora_rank": 0}), installed_packages=False)
    config = toy_config(**{"adapter.method": "lora", "adapter.lora_rank": 0})
    with pytest.raises(ConfigError, match=r"^adapter.lora_rank=0 must be >= 1$"):
        Trainer(make_toy_model(hidden=8, num_layers=1), config, make_mesh(1, 1), tmp_path)


def test_lora_has_no_slot_axis():
    assert [validation.has_slot_axis(m) for m in METHODS] == [m != "lora" for m in METHODS]
    # neither r_max's bound on initial_rank nor the components split applies to lora
    fields = {"adapter.r_max": 4, "adapter.initial_rank": 6, "mesh.components": 3, "train.batch_size": 6}
    validation.check_fields(_config(**fields, **{"adapter.method": "lora"}), installed_packages=False)
    with pytest.raises(ConfigError, match="initial_rank=6 is larger than adapter.r_max=4"):
        validation.check_fields(_config(**fields, **{"adapter.method": "joint"}), installed_packages=False)


# ------------------------------------------------------------------ batches over mesh.data (x grad_accum_steps)


@pytest.mark.parametrize("rows, data, accum, splits", [
    (32, 4, 1, True), (30, 4, 1, False), (32, 4, 3, False), (24, 4, 3, True), (6, 1, 4, False),
])
def test_a_batch_splits_over_data_devices_and_micro_batches(rows, data, accum, splits):
    assert validation.batch_splits(rows, data, accum) is splits


def test_micro_batches_refuse_rows_the_accumulation_does_not_divide():
    from adapad_jax.training.step import accumulate_micro_batches

    batch = {"x": jnp.ones((6, 2))}
    with pytest.raises(ValueError, match="train.grad_accum_steps=4 does not divide the 6 batch rows"):
        accumulate_micro_batches(lambda b, first: b["x"].sum(), batch, 4, jnp.asarray(0))
    assert float(accumulate_micro_batches(lambda b, first: b["x"].sum(), batch, 3, jnp.asarray(0))) == 12.0


# ------------------------------------------------------------------ tasks and model task kinds


def test_every_task_is_a_pipeline_task_or_a_registered_one_exactly_once():
    assert sorted(TASK_NAMES) == sorted([*TASKS, *REGISTERED])
    assert len(set(TASK_NAMES)) == len(TASK_NAMES)
    for name in TASK_NAMES:  # each name the config accepts is one the run can resolve
        assert name in TASKS or name in REGISTERED


def test_every_model_task_has_a_loss_and_a_tiny_checkpoint_head():
    from adapad_jax.testing.tiny import _check_model_task
    from adapad_jax.training.losses import loss_terms

    assert MODEL_TASKS == ("classification", "regression", "qa", "lm")
    assert [_check_model_task(task, 3) for task in MODEL_TASKS] == [3, 1, 2, 3]
    with pytest.raises(ValueError, match=r"expected one of \('classification', 'regression', 'qa', 'lm'\)"):
        loss_terms("ner", {}, {})


# ------------------------------------------------------------------ run.py's up-front checks, now in validation


def test_the_run_checks_name_the_problem(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"^output_dir '{blocker}' exists and is not a directory$"):
        validation.check_output_dir_is_directory(blocker)
    with pytest.raises(ConfigError, match="cannot be created: .* is a file, not a directory"):
        validation.check_output_dir_path(blocker / "run")
    config = _config(**{"mesh.data": 1, "mesh.components": 1})
    validation.check_processes_use_all_devices(config, 8, 1)  # one process may use part of its devices
    with pytest.raises(ConfigError, match=r"^with 2 processes the mesh must use all 8 devices: mesh.data=1 x "
                                          r"mesh.components=1 = 1$"):
        validation.check_processes_use_all_devices(config, 8, 2)
    with pytest.raises(ConfigError, match="^training needs data"):
        validation.check_loaded_data(types.SimpleNamespace(train=None, evals={"validation": 1}), want_train=True)
    validation.check_loaded_data(types.SimpleNamespace(train=None, evals={"validation": 1}), want_train=False)
    with pytest.raises(ConfigError, match="^no validation data"):
        validation.check_loaded_data(types.SimpleNamespace(train=1, evals={}), want_train=True)
