"""Allocator on hand-made inputs, and budget spending in a short training run."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.methods.allocator import AllocatorConfig, init_allocator, masks_from_rank, update_allocator
from adapad_jax.testing.toy import enable_compilation_cache

enable_compilation_cache()

KEY = jax.random.PRNGKey(0)


def _state(rank, budget_left, imp, unc, r_max=4):
    rank = jnp.asarray(rank, jnp.int32)
    budget_left = jnp.asarray(budget_left, jnp.int32)
    committed, reserve = masks_from_rank(rank, r_max, budget_left)
    return {"committed": committed, "reserve": reserve, "rank": rank, "imp_ema": jnp.asarray(imp, jnp.float32),
            "unc_ema": jnp.asarray(unc, jnp.float32), "budget_left": budget_left}


def _frozen_ema_config(**kw):
    """beta = 1 keeps the EMAs (and so the scores) exactly as set in the state."""
    return AllocatorConfig(**{"r_max": 4, "top_k": 2, "growth_interval": 10, "beta1": 1.0, "beta2": 1.0, **kw})


def test_ema_update_matches_hand_computation():
    cfg = AllocatorConfig(r_max=4, top_k=1, growth_interval=10, beta1=0.85, beta2=0.85)
    state = _state([1, 1], 4, [0.2, 0.0], [0.1, 0.3])
    importance = jnp.array([1.0, 0.5])
    new, grew = update_allocator(state, importance, jnp.asarray(3), cfg, KEY)
    i_bar = np.array([0.85 * 0.2 + 0.15 * 1.0, 0.85 * 0.0 + 0.15 * 0.5])
    u_bar = np.array([0.85 * 0.1, 0.85 * 0.3]) + 0.15 * np.abs(np.array([1.0, 0.5]) - i_bar)
    np.testing.assert_allclose(new["imp_ema"], i_bar, rtol=1e-6)
    np.testing.assert_allclose(new["unc_ema"], u_bar, rtol=1e-6)
    assert not bool(grew)
    np.testing.assert_array_equal(new["rank"], [1, 1])


@pytest.mark.parametrize("step,expect_growth", [(9, False), (10, False), (15, False), (20, True), (30, True), (31, False)])
def test_warm_up_round_and_growth_schedule(step, expect_growth):
    state = _state([1, 1, 1], 6, [3.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    new, grew = update_allocator(state, jnp.zeros(3), jnp.asarray(step), _frozen_ema_config(), KEY)
    assert bool(grew) == expect_growth
    np.testing.assert_array_equal(new["rank"], [2, 2, 1] if expect_growth else [1, 1, 1])


def test_promotion_moves_reserve_and_spends_budget():
    state = _state([1, 2, 1], 6, [3.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    new, _ = update_allocator(state, jnp.zeros(3), jnp.asarray(20), _frozen_ema_config(), KEY)
    np.testing.assert_array_equal(new["rank"], [2, 3, 1])
    np.testing.assert_array_equal(new["committed"], [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(new["reserve"], [[0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]])
    assert int(new["budget_left"]) == 4


def test_ties_at_threshold_go_to_lowest_module_index():
    state = _state([1, 1, 1, 1], 8, [1.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    new, _ = update_allocator(state, jnp.zeros(4), jnp.asarray(20), _frozen_ema_config(top_k=2), KEY)
    np.testing.assert_array_equal(new["rank"], [1, 2, 2, 1])


def test_budget_remainder_smaller_than_top_k():
    state = _state([1, 1, 1, 1], 1, [1.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    new, grew = update_allocator(state, jnp.zeros(4), jnp.asarray(20), _frozen_ema_config(top_k=3), KEY)
    assert bool(grew)
    np.testing.assert_array_equal(new["rank"], [1, 2, 1, 1])
    assert int(new["budget_left"]) == 0
    assert not bool(new["reserve"].any()), "no reserve is kept once the budget is spent"
    again, grew = update_allocator(new, jnp.zeros(4), jnp.asarray(30), _frozen_ema_config(top_k=3), KEY)
    assert not bool(grew)
    np.testing.assert_array_equal(again["rank"], [1, 2, 1, 1])


def test_module_at_r_max_is_skipped():
    state = _state([4, 1, 1], 6, [9.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    assert not bool(state["reserve"][0].any())
    new, _ = update_allocator(state, jnp.zeros(3), jnp.asarray(20), _frozen_ema_config(top_k=1), KEY)
    np.testing.assert_array_equal(new["rank"], [4, 2, 1])


def test_no_eligible_module():
    state = _state([4, 4], 3, [1.0, 2.0], [1.0, 1.0])
    new, grew = update_allocator(state, jnp.zeros(2), jnp.asarray(20), _frozen_ema_config(), KEY)
    assert not bool(grew)
    np.testing.assert_array_equal(new["rank"], [4, 4])
    assert int(new["budget_left"]) == 3


def test_growth_disabled():
    state = _state([1, 1], 3, [1.0, 2.0], [1.0, 1.0])
    _, grew = update_allocator(state, jnp.zeros(2), jnp.asarray(20), _frozen_ema_config(grow=False), KEY)
    assert not bool(grew)


def test_uniform_importance_is_seeded_and_picks_eligible_modules():
    state = _state([4, 1, 1, 1, 1, 1], 10, [9.0, 0, 0, 0, 0, 0], [9.0, 0, 0, 0, 0, 0])
    cfg = _frozen_ema_config(top_k=2, importance="uniform")
    picks = set()
    for seed in range(6):
        a, _ = update_allocator(state, jnp.zeros(6), jnp.asarray(20), cfg, jax.random.PRNGKey(seed))
        b, _ = update_allocator(state, jnp.zeros(6), jnp.asarray(20), cfg, jax.random.PRNGKey(seed))
        np.testing.assert_array_equal(a["rank"], b["rank"])
        grown = np.nonzero(np.asarray(a["rank"]) - np.asarray(state["rank"]))[0]
        assert len(grown) == 2 and 0 not in grown
        picks.add(tuple(grown))
    assert len(picks) > 1, "uniform choice should vary with the seed"


def test_module_importance_hand_computed():
    slots = {"a": [jnp.array([[1.0, -2.0], [3.0, 4.0]])], "b": [jnp.array([[0.5], [1.0]])]}
    grads = {"a": [jnp.array([[2.0, 1.0], [1.0, 1.0]])], "b": [jnp.array([[-4.0], [5.0]])]}
    committed = jnp.array([[True, False]])
    # committed slot 0 only: |1*2| + |-2*1| + |0.5*-4| = 6 over 3 entries
    np.testing.assert_allclose(alloc_lib.module_importance(slots, grads, committed), [2.0])
    both = jnp.array([[True, True]])
    np.testing.assert_allclose(alloc_lib.module_importance(slots, grads, both), [(6.0 + 3 + 4 + 5) / 6])


def test_budget_smaller_than_initial_ranks_is_rejected():
    with pytest.raises(ValueError, match="rank_budget"):
        init_allocator(5, 4, 2, 9)


def test_growth_spends_budget_exactly():
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.testing.toy import ToyBatches, make_toy_model, planted_teacher, toy_config

    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    cfg = toy_config(**{"adapter.rank_budget": 9, "adapter.top_k": 2, "adapter.growth_interval": 2,
                        "adapter.r_max": 4})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, cfg, make_mesh(1, 1), out)
        data = ToyBatches(model, teacher, 8)
        trainer.restore_or_init(data.state())
        trainer.train(data, 7, data.state, progress=False)
        assert sum(trainer.ranks().values()) == 4 + 2 + 2  # growth at steps 4 and 6
        trainer.train(data, 12, data.state, progress=False)
        ranks = trainer.ranks()
        assert sum(ranks.values()) == 9
        assert max(ranks.values()) <= 4
        assert int(trainer.state["alloc"]["budget_left"]) == 0
        assert not bool(trainer.state["alloc"]["reserve"].any())
        trainer.close()


def test_without_advance_learning_reserve_waits_at_init_until_promoted():
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.testing.toy import ToyBatches, make_toy_model, planted_teacher, toy_config

    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    cfg = toy_config(**{"adapter.rank_budget": 9, "adapter.top_k": 2, "adapter.growth_interval": 2,
                        "adapter.advance_learning": False, "adapter.init_std": 0.1,
                        "optim.adapter_weight_decay": 0.1})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, cfg, make_mesh(1, 1), out)
        data = ToyBatches(model, teacher, 8)
        trainer.restore_or_init(data.state())
        init = jax.device_get(trainer.state["trainable"]["slots"])
        assert trainer.live_slots == 1
        trainer.train(data, 4, data.state, progress=False)  # growth at step 4
        rank = np.asarray(trainer.state["alloc"]["rank"])
        grown = np.nonzero(rank == 2)[0]
        assert len(grown) == 2 and trainer.live_slots == 2
        slots = jax.device_get(trainer.state["trainable"]["slots"])
        for m in range(len(model.targets)):
            np.testing.assert_array_equal(slots["a"][m][1:], init["a"][m][1:])  # never trained, not decayed
            assert np.abs(slots["a"][m][0] - init["a"][m][0]).max() > 0
        trainer.train(data, 5, data.state, progress=False)
        slots = jax.device_get(trainer.state["trainable"]["slots"])
        for m in grown:
            assert np.abs(slots["a"][m][1] - init["a"][m][1]).max() > 0, "promoted slot trains from its init"
        trainer.close()


@pytest.mark.parametrize("modules, r0, r_max, budget, top_k, interval, steps", [
    (6, 1, 4, 20, 2, 10, 45),    # schedule-bound: 6 + (4 - 1) * 2 = 12 < 20
    (6, 1, 4, 10, 3, 10, 100),   # budget-bound
    (3, 1, 8, 100, 2, 5, 100),   # r_max-bound: 3 * 8 = 24
    (5, 2, 4, 20, 9, 10, 35),    # top_k > M: at most M per round, 10 + 2 * 5 = 20
    (4, 1, 4, 16, 2, 10, 15),    # no growth round yet (growth from step 2T)
])
def test_reachable_total_rank_matches_the_allocator(modules, r0, r_max, budget, top_k, interval, steps):
    """The formula against the allocator itself, stepped ``steps`` times with random importances."""
    cfg = AllocatorConfig(r_max=r_max, top_k=top_k, growth_interval=interval)
    state = init_allocator(modules, r_max, r0, budget)
    update = jax.jit(lambda s, imp, t: update_allocator(s, imp, t, cfg, KEY))
    first_full = None
    for t in range(1, steps + 1):
        state, _ = update(state, jax.random.uniform(jax.random.fold_in(KEY, t), (modules,)), jnp.asarray(t))
        if first_full is None and int(state["budget_left"]) == 0:
            first_full = t
    reachable = alloc_lib.reachable_total_rank(modules, r0, budget, steps, cfg)
    assert int(state["rank"].sum()) == reachable
    assert int(state["budget_spent_step"]) == (first_full if first_full is not None else -1)


def test_reachable_total_rank_of_the_paper_rte_config():
    """RTE: 72 modules, r0 1, budget 144, r_max 4, top-k 3, T 200, 3900 steps -> 72 + 18 x 3 = 126."""
    cfg = AllocatorConfig(r_max=4, top_k=3, growth_interval=200)
    assert alloc_lib.reachable_total_rank(72, 1, 144, 3900, cfg) == 126
    assert alloc_lib.reachable_total_rank(72, 1, 144, 10_000, cfg) == 144
    assert alloc_lib.reachable_total_rank(72, 1, 144, 10_000, AllocatorConfig(4, 3, 200, grow=False)) == 72
    assert int(init_allocator(4, 2, 2, 8)["budget_spent_step"]) == 0  # nothing to spend: spent at the start


def test_trainer_reports_the_rank_schedule(tmp_path):
    from adapad_jax.run.core import rank_schedule_line
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.testing.toy import ToyBatches, make_toy_model, planted_teacher, toy_config

    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    cfg = toy_config(**{"adapter.rank_budget": 12, "adapter.top_k": 2, "adapter.growth_interval": 2,
                        "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path)
    data = ToyBatches(model, teacher, 8)
    trainer.restore_or_init(data.state())
    start = trainer.rank_schedule(7)
    assert start == {"rank_budget": 12, "reachable_total_rank": 4 + 2 * 2, "total_rank": 4, "budget_spent_step": None}
    line = rank_schedule_line(start, cfg)
    assert "growth can reach total rank 8 of the budget 12" in line and "T=2" in line
    trainer.train(data, 7, data.state, progress=False)
    assert trainer.rank_schedule(7)["total_rank"] == 8 and trainer.rank_schedule()["budget_spent_step"] is None
    trainer.train(data, 10, data.state, progress=False)
    assert trainer.rank_schedule() == {"rank_budget": 12, "reachable_total_rank": 12, "total_rank": 12,
                                       "budget_spent_step": 10}
    assert "more steps" not in rank_schedule_line(trainer.rank_schedule(), cfg)
    trainer.close()


@pytest.mark.parametrize("imp, unc, top_k, expected_rank", [
    # importance alone would pick modules 0 and 1; the scores 3*0.1, 2*1, 1*1 = 0.3, 2, 1 pick 1 and 2
    ([3.0, 2.0, 1.0], [0.1, 1.0, 1.0], 2, [1, 2, 2]),
    # importance alone: module 3; scores 0.5*4, 1*1, 2*0.5, 4*0.25 = 2, 1, 1, 1: module 0
    ([0.5, 1.0, 2.0, 4.0], [4.0, 1.0, 0.5, 0.25], 1, [2, 1, 1, 1]),
    # a low-importance module with a very uncertain estimate wins over a steady important one
    ([1.0, 0.2], [0.01, 0.3], 1, [1, 2]),
])
def test_promotion_ranks_by_importance_times_uncertainty(imp, unc, top_k, expected_rank):
    """Cases where importance alone and importance x uncertainty pick different modules (hand-computed)."""
    state = _state([1] * len(imp), 8, imp, unc)
    by_importance = np.argsort(-np.asarray(imp), kind="stable")[:top_k]
    by_score = np.argsort(-np.asarray(imp) * np.asarray(unc), kind="stable")[:top_k]
    assert set(by_importance) != set(by_score)
    new, grew = update_allocator(state, jnp.zeros(len(imp)), jnp.asarray(20), _frozen_ema_config(top_k=top_k), KEY)
    assert bool(grew)
    np.testing.assert_array_equal(new["rank"], expected_rank)


def test_promotion_score_uses_the_updated_emas():
    """The score of a growth step is I_bar * U_bar after this step's EMA update (hand-computed, beta 0.5)."""
    cfg = AllocatorConfig(r_max=4, top_k=1, growth_interval=10, beta1=0.5, beta2=0.5)
    state = _state([1, 1], 4, [1.0, 0.6], [0.1, 0.1])
    importance = jnp.array([1.0, 0.2])
    # I_bar = (1.0, 0.4); U_bar = 0.05 + 0.5 |I - I_bar| = (0.05, 0.15); scores (0.05, 0.06): module 1
    # (importance alone, before or after the update, would pick module 0).
    new, _ = update_allocator(state, importance, jnp.asarray(20), cfg, KEY)
    np.testing.assert_allclose(new["imp_ema"], [1.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(new["unc_ema"], [0.05, 0.15], rtol=1e-6)
    np.testing.assert_array_equal(new["rank"], [1, 2])
