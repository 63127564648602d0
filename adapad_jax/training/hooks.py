"""The train loop's hooks: what happens after a step (logging, evaluation, checkpoints, the guard, preemption).

``Trainer.train`` is a plain loop: take a batch, run the step, then ``TrainerHooks.run`` calls each hook whose
cadence is due, in the order they were added (the order is the order of effects). A new sink or method adds a
hook instead of editing the loop. A cadence is ``every=N`` (steps N, 2N, ... before the last) and ``at_end``
(whether the last step fires); ``when`` is any other rule of the ``StepInfo``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax

from adapad_jax.training import recovery
from adapad_jax.training.guard import FiniteGuard


@dataclass
class StepInfo:
    """One completed step as the hooks see it; hooks that run note what they did (``eval_metrics``, ``saved``)."""

    step: int
    num_steps: int
    metrics: Any  # the step's metrics (device arrays)
    live_slots: int  # L after this step (refreshed at growth steps by the loop's first hooks)
    eval_metrics: Mapping[str, Any] | None = None  # set when the evaluation hook ran at this step
    saved: bool = False  # set when a checkpoint of this step was written

    @property
    def evaluated(self) -> bool:
        """Whether this step was evaluated."""
        return self.eval_metrics is not None


@dataclass(frozen=True)
class Cadence:
    """Due after steps ``every``, ``2 * every``, ... before the last step; at the last step iff ``at_end``.

    ``every`` = 0 (or None): only at the last step (when ``at_end``).
    """

    every: int | None
    at_end: bool = True

    def due(self, step: int, num_steps: int) -> bool:
        """Whether a hook with this cadence fires after completed step ``step`` of ``num_steps``."""
        if step == num_steps:
            return self.at_end
        return self.every is not None and self.every > 0 and step % self.every == 0


Hook = Callable[[StepInfo], None]


class TrainerHooks:
    """Hooks with cadences, called in the order added; ``before_step`` and ``finish`` for the loop's edges."""

    def __init__(self) -> None:
        self._hooks: list[tuple[Hook, Callable[[StepInfo], bool]]] = []
        self._at_finish: list[Callable[[], None]] = []

    def add_hook(self, hook: Hook, every: int | None = None, *, at_end: bool = True,
                 when: Callable[[StepInfo], bool] | None = None) -> Hook:
        """Call ``hook(info)`` on the steps of ``Cadence(every, at_end)``, or where ``when(info)`` holds."""
        if when is None:
            cadence = Cadence(every, at_end)
            when = lambda info: cadence.due(info.step, info.num_steps)  # noqa: E731
        self._hooks.append((hook, when))
        return hook

    def add_finish(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once when the loop has run every step (not when a hook raised)."""
        self._at_finish.append(fn)

    def before_step(self, step: int) -> None:
        """Before 1-based step ``step`` runs: each hook's ``before_step`` method, where it has one."""
        for hook, _ in self._hooks:
            before = getattr(hook, "before_step", None)
            if before is not None:
                before(step)

    def run(self, info: StepInfo) -> None:
        """After a step: every hook due at ``info``, in order."""
        for hook, when in self._hooks:
            if when(info):
                hook(info)

    def finish(self) -> None:
        """After the last step: the ``add_finish`` callables, in order."""
        for fn in self._at_finish:
            fn()


# ------------------------------------------------------------------------------------------------- hooks


class GuardHook:
    """The non-finite guard: ``update`` folds every step in (no sync); ``check`` raises ``Diverged`` (syncs)."""

    def __init__(self, start_step: int, saved_step: Callable[[], int | None]):
        self.guard = FiniteGuard(start_step)
        self._saved_step = saved_step

    def update(self, info: StepInfo) -> None:
        """Record whether this step's loss and gradients were finite (asynchronous)."""
        self.guard.update(info.metrics)

    def check(self, info: StepInfo | None = None) -> None:
        """Raise ``Diverged`` if any step so far was not finite, naming the newest checkpoint."""
        self.guard.check(self._saved_step())


class ProfileHook:
    """The ``jax.profiler`` window (``profiling.StepProfiler``): starts before a step, stops after one."""

    def __init__(self, profiler: Any):
        self.profiler = profiler

    def before_step(self, step: int) -> None:
        """Start the trace when ``step`` is the window's first."""
        self.profiler.before_step(step)

    def __call__(self, info: StepInfo) -> None:
        """Note the step's outputs; stop after the window's last step."""
        self.profiler.after_step(info.step, info.metrics)


class LogHook:
    """A metrics record of the step (``seconds_per_step`` over the steps since the last record) to each sink."""

    def __init__(self, start_step: int, ranks: Callable[[], Mapping[str, int]], run_log: Any,
                 sinks: tuple[Callable[[dict], None], ...] = (), clock: Callable[[], float] = time.perf_counter):
        self._ranks, self._log, self._sinks, self._clock = ranks, run_log, sinks, clock
        self._last_time, self._last_logged = clock(), start_step

    def __call__(self, info: StepInfo) -> None:
        """Write the record and the committed ranks to the run log, then pass the record to the sinks."""
        host = jax.device_get(info.metrics)
        now = self._clock()
        record = {
            "step": info.step, "loss": host["loss"], "lr": host["lr"], "grad_norm": host["grad_norm"],
            "orth_penalty": host["orth_penalty"], "live_slots": info.live_slots, "total_rank": host["total_rank"],
            "slot_losses": host["slot_losses"],
            "seconds_per_step": (now - self._last_time) / (info.step - self._last_logged),  # the last: fewer steps
        }
        self._last_time, self._last_logged = now, info.step
        self._log.write(record)
        self._log.write_ranks(info.step, self._ranks())
        for sink in self._sinks:
            sink(record)


class EvalHook:
    """Evaluate; the last step's evaluation is the run's final one. Notes the results in ``info.eval_metrics``."""

    def __init__(self, evaluate: Callable[[], dict], run_log: Any,
                 sinks: tuple[Callable[[int, Any], None], ...] = ()):
        self._evaluate, self._log, self._sinks = evaluate, run_log, sinks

    def __call__(self, info: StepInfo) -> None:
        """Write ``{"step", "eval"[, "final"]}`` to the run log and tell the sinks."""
        final = {"final": True} if info.step == info.num_steps else {}
        self._log.write({"step": info.step, "eval": self._evaluate(), **final})
        info.eval_metrics = self._log.last_eval
        for sink in self._sinks:
            sink(info.step, info.eval_metrics)


class CheckpointHook:
    """Check the guard, then save; with ``select_best`` the checkpoint carries the step's evaluation."""

    def __init__(self, every: int, save: Callable[[dict | None], None], before_save: Callable[[], None],
                 select_best: bool = False):
        self.cadence, self._save, self._before_save, self.select_best = Cadence(every, True), save, before_save, \
            select_best

    def due(self, info: StepInfo) -> bool:
        """Every ``every`` steps, the last step, and every evaluated step when selecting the best checkpoint."""
        return self.cadence.due(info.step, info.num_steps) or (info.evaluated and self.select_best)

    def __call__(self, info: StepInfo) -> None:
        """Save this step (after the guard's check), noting ``info.saved``."""
        self._before_save()
        self._save(info.eval_metrics if info.evaluated and self.select_best else None)
        info.saved = True


class PreemptionHook:
    """A stop request (SIGTERM/SIGINT, agreed across processes at sync steps): checkpoint, then ``Preempted``."""

    def __init__(self, stop: Any, sync_point: Callable[[StepInfo], bool], save: Callable[[], None],
                 before_save: Callable[[], None], checkpointer: Any):
        self._stop, self._sync_point, self._save = stop, sync_point, save
        self._before_save, self._checkpointer = before_save, checkpointer

    def __call__(self, info: StepInfo) -> None:
        """When a stop is agreed: guard check, save unless this step was saved already, raise ``Preempted``."""
        if recovery.stop_agreed(self._stop.requested, self._sync_point(info)):
            self._before_save()
            if not info.saved:
                self._save()
            recovery.preempted(self._stop.signal_name or "a signal on another process", info.step,
                               self._checkpointer)
