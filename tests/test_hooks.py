"""The train loop's hooks alone (training/hooks.py): cadences, order, and the guard / checkpoint / stop / log hooks
on stub state, without a model or a Trainer."""

from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.runtime.failures import Diverged, Preempted
from adapad_jax.training.hooks import (
    Cadence, CheckpointHook, EvalHook, GuardHook, LogHook, PreemptionHook, StepInfo, TrainerHooks,
)


def _fired(num_steps: int, start: int = 0, **cadence) -> list[int]:
    hooks, seen = TrainerHooks(), []
    hooks.add_hook(lambda info: seen.append(info.step), **cadence)
    for step in range(start + 1, num_steps + 1):
        hooks.run(StepInfo(step, num_steps, None, 1))
    return seen


@pytest.mark.parametrize(
    "cadence, expected",
    [
        ({"every": 3}, [3, 6, 9, 10]),  # N, 2N, ... and the last step
        ({"every": 5}, [5, 10]),  # the last step is a multiple: fires once
        ({"every": 3, "at_end": False}, [3, 6, 9]),
        ({"every": 5, "at_end": False}, [5]),  # the last step fires only with at_end, even when a multiple
        ({"every": 0}, [10]),  # only at the end
        ({"every": None, "at_end": False}, []),
        ({"every": -2}, [10]),  # a negative interval is "never before the end", not every other step
        ({"every": 1}, list(range(1, 11))),
    ],
)
def test_cadence_fires_at_multiples_and_the_last_step(cadence, expected):
    assert _fired(10, **cadence) == expected


def test_cadence_counts_from_step_zero_after_a_resume():
    assert _fired(10, start=4, every=3) == [6, 9, 10]
    assert Cadence(4).due(8, 10) and not Cadence(4).due(6, 10)


def test_hooks_run_in_the_order_added_and_a_hook_sees_what_earlier_ones_noted():
    hooks, seen = TrainerHooks(), []

    class Before:
        def before_step(self, step):
            seen.append(("before", step))

        def __call__(self, info):
            seen.append(("first", info.step))
            info.eval_metrics = {"accuracy": 1.0}

    hooks.add_hook(Before(), every=1)
    hooks.add_hook(lambda info: seen.append(("second", info.step, info.evaluated)), when=lambda info: info.evaluated)
    hooks.add_finish(lambda: seen.append(("finish",)))
    hooks.before_step(1)
    hooks.run(StepInfo(1, 1, None, 1))
    hooks.finish()
    assert seen == [("before", 1), ("first", 1), ("second", 1, True), ("finish",)]


def _metrics(loss: float, grad_norm: float = 1.0) -> dict:
    return {"slot_losses": jnp.array([loss, 0.5]), "grad_norm": jnp.array(grad_norm)}


def test_guard_hook_raises_naming_the_first_non_finite_step_and_the_newest_checkpoint():
    guard = GuardHook(start_step=3, saved_step=lambda: 4)
    for step, loss in [(4, 1.0), (5, float("nan")), (6, 1.0)]:
        guard.update(StepInfo(step, 10, _metrics(loss), 1))
    with pytest.raises(Diverged, match=r"the loss is not finite .* at step 5;.*newest checkpoint \(step 4\)"):
        guard.check()


def test_guard_hook_passes_while_every_step_is_finite():
    guard = GuardHook(start_step=0, saved_step=lambda: None)
    guard.update(StepInfo(1, 2, _metrics(1.0, 2.0), 1))
    guard.check()  # must not raise
    guard.update(StepInfo(2, 2, _metrics(1.0, float("inf")), 1))
    with pytest.raises(Diverged, match="the gradient norm is not finite .* at step 2;.*no checkpoint was written"):
        guard.check()


def test_checkpoint_hook_saves_at_its_cadence_the_end_and_evaluated_steps_when_selecting_the_best():
    calls = []
    checkpoint = CheckpointHook(2, lambda best: calls.append(("save", best)), lambda: calls.append("guard"),
                                select_best=True)
    hooks = TrainerHooks()
    hooks.add_hook(lambda info: setattr(info, "eval_metrics", {"accuracy": 0.5}), when=lambda info: info.step == 3)
    hooks.add_hook(checkpoint, when=checkpoint.due)
    saved = []
    for step in range(1, 6):
        info = StepInfo(step, 5, None, 1)
        hooks.run(info)
        saved.append(info.saved)
    assert saved == [False, True, True, True, True]
    assert calls == ["guard", ("save", None), "guard", ("save", {"accuracy": 0.5}), "guard", ("save", None),
                     "guard", ("save", None)]


def test_checkpoint_hook_without_select_best_ignores_evaluations():
    checkpoint = CheckpointHook(0, lambda best: None, lambda: None, select_best=False)
    info = StepInfo(3, 5, None, 1, eval_metrics={"accuracy": 0.5})
    assert not checkpoint.due(info) and checkpoint.due(StepInfo(5, 5, None, 1))


@pytest.mark.parametrize("already_saved", [False, True])
def test_preemption_hook_checks_saves_once_and_raises_preempted(tmp_path, already_saved):
    calls = []
    stop = types.SimpleNamespace(requested=True, signal_name="SIGTERM")
    hook = PreemptionHook(stop, lambda info: True, lambda: calls.append("save"), lambda: calls.append("guard"),
                          types.SimpleNamespace(directory=tmp_path))
    expected = rf"SIGTERM: stopped after step 7 and saved a checkpoint at step 7 in {tmp_path}"
    with pytest.raises(Preempted, match=expected):
        hook(StepInfo(7, 10, None, 1, saved=already_saved))
    assert calls == (["guard"] if already_saved else ["guard", "save"])


def test_preemption_hook_does_nothing_without_a_request(tmp_path):
    calls = []
    stop = types.SimpleNamespace(requested=False, signal_name=None)
    hook = PreemptionHook(stop, lambda info: True, lambda: calls.append("save"), lambda: calls.append("guard"),
                          types.SimpleNamespace(directory=tmp_path))
    hook(StepInfo(7, 10, None, 1))
    assert calls == []


class _RunLog:
    def __init__(self):
        self.records, self.ranks, self.last_eval = [], [], None

    def write(self, record):
        self.records.append(record)
        if "eval" in record:
            self.last_eval = record["eval"]

    def write_ranks(self, step, ranks):
        self.ranks.append((step, ranks))


def test_log_hook_times_each_record_over_the_steps_since_the_last_one():
    times = iter([100.0, 106.0, 107.5])  # construction, then two records
    log, sunk = _RunLog(), []
    hook = LogHook(start_step=2, ranks=lambda: {"q": 3}, run_log=log, sinks=(sunk.append,), clock=lambda: next(times))
    metrics = {k: np.float32(1.5) for k in ("loss", "lr", "grad_norm", "orth_penalty", "total_rank")}
    metrics["slot_losses"] = np.array([1.0, 2.0], np.float32)
    hook(StepInfo(5, 6, metrics, 4))  # steps 3..5 in 6 s
    hook(StepInfo(6, 6, metrics, 4))  # the last record covers one step
    assert [r["seconds_per_step"] for r in log.records] == [2.0, 1.5]
    assert [(r["step"], r["live_slots"]) for r in log.records] == [(5, 4), (6, 4)]
    assert log.ranks == [(5, {"q": 3}), (6, {"q": 3})] and sunk == log.records


def test_eval_hook_marks_only_the_last_steps_evaluation_final():
    log, sunk = _RunLog(), []
    hook = EvalHook(lambda: {"accuracy": 0.25}, log, sinks=(lambda step, m: sunk.append((step, m)),))
    first, last = StepInfo(2, 4, None, 1), StepInfo(4, 4, None, 1)
    hook(first)
    hook(last)
    assert log.records == [{"step": 2, "eval": {"accuracy": 0.25}},
                           {"step": 4, "eval": {"accuracy": 0.25}, "final": True}]
    assert first.eval_metrics == {"accuracy": 0.25} and sunk == [(2, {"accuracy": 0.25}), (4, {"accuracy": 0.25})]


def test_trainer_settings_read_the_fields_once_with_the_loops_defaults():
    from adapad_jax.testing.toy import toy_config
    from adapad_jax.training.settings import TrainerSettings

    config = toy_config(**{"train.log_every_steps": 0, "train.num_steps": -1, "checkpoint.every_steps": 7,
                           "optim.learning_rate": 3e-3})
    del config.train["profile_num_steps"]  # an older config without the field: one traced step
    settings = TrainerSettings.from_config(config)
    assert (settings.log_every, settings.num_steps, settings.checkpoint_every) == (1, 1, 7)
    assert settings.profile_num_steps == 1 and settings.optim.learning_rate == 3e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log_every = 5
