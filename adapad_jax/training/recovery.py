"""What the trainer does when things go wrong: damaged checkpoints, resumes that do not fit, a stop request,
a non-finite state about to be saved, a checkpoint write that fails.

Damaged checkpoints: restoring the newest step is attempted; if it cannot be read (truncated data file, missing
``state/_METADATA`` or ``meta/metadata``, ...) the step directory is moved to ``<checkpoints>.damaged/<step>``
(never deleted) with one line saying so, and the next newest is tried.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.config.schema import ConfigError
from adapad_jax.runtime.failures import Diverged, OutputWriteError, Preempted, describe_os_error, os_error_in_chain
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.training.guard import state_is_finite


class ResumeMismatch(ConfigError):
    """The checkpoint was written by a run of another shape (method, modules, model sizes, budget)."""


class CheckpointDamaged(ConfigError):
    """A checkpoint step that cannot be read back."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {reason}")
        self.step, self.reason = step, reason


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _quiet_closed_loop_errors() -> None:
    """After a failed orbax read, tensorstore reads still in flight complete into orbax's closed event loop and
    report "Event loop is closed" through ``sys.unraisablehook`` (a bare traceback each); drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


class _OrphanedOrbaxTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" (and a gathering future's) for orbax tasks: when one
    read or write of a checkpoint fails, its siblings fail too and are never awaited; the first failure is
    already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
            return True
        frames = traceback.extract_tb(record.exc_info[2])
        return not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


class _OrbaxThreadErrors(logging.Filter):
    """Drops orbax's absl log of an exception in one of its save threads: the save re-raises that exception,
    which is reported once (one line for a write error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (f"{os.sep}orbax{os.sep}" in record.pathname and "raised an exception" in record.getMessage())


_ORPHANED_TASKS = _OrphanedOrbaxTasks()
_THREAD_ERRORS = _OrbaxThreadErrors()


def quiet_orbax_failures() -> None:
    """Install (once) the filters that keep a failed checkpoint read or write to the one error it raises."""
    _quiet_closed_loop_errors()
    logging.getLogger("asyncio").addFilter(_ORPHANED_TASKS)  # a filter already present is not added again
    logging.getLogger("absl").addFilter(_THREAD_ERRORS)


def read_or_damaged(step: int, read: Callable[[], Any]) -> Any:
    """``read()``, with any failure to read the files turned into ``CheckpointDamaged``."""
    quiet_orbax_failures()
    try:
        return read()
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointDamaged(step, f"{type(err).__name__}: {reason}") from None


def quarantine(checkpointer: Any, step: int) -> Path:
    """Move step ``step`` out of the checkpoint directory to ``<dir>.damaged/<step>[-n]`` (process 0)."""
    source = Path(checkpointer.directory) / str(step)
    target_dir = Path(f"{checkpointer.directory}.damaged")
    target = target_dir / str(step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"quarantine-{step}-start")
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while target.exists():
            target, n = target_dir / f"{step}-{n}", n + 1
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"quarantine-{step}-done")
    checkpointer.manager.reload()
    return target


def restore_newest_intact(trainer: Any) -> dict:
    """Restore the newest readable checkpoint into ``trainer``, moving damaged newer ones aside; its data state."""
    for step in reversed(trainer.checkpointer.all_steps()):
        try:
            return trainer.restore(step)
        except CheckpointDamaged as err:
            if trainer.checkpointer.read_only:
                raise ConfigError(f"{err.args[0]} (in {trainer.checkpointer.directory})") from None
            moved = quarantine(trainer.checkpointer, step)
            _log(f"warning: checkpoint step {step} in {trainer.checkpointer.directory} cannot be read "
                 f"({err.reason[:120]}); moved it to {moved} and trying the previous one")
    moved_to = f"{trainer.checkpointer.directory}.damaged"
    raise ConfigError(f"no intact checkpoint left in {trainer.checkpointer.directory}: the damaged ones were moved to "
                      f"{moved_to}; rerun to start from scratch, or move one back")


def _shape_signature(state: Any) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    text = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{x.dtype}" for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity_meta(trainer: Any) -> dict[str, Any]:
    """Extra checkpoint metadata for resume checks: state shapes and the rank budget in force."""
    return {"state_shapes": _shape_signature(trainer.state), "rank_budget": trainer.rank_budget}


def check_same_shapes(step: int, meta: dict, fresh: Any, directory: Any) -> None:
    """Refuse (one line) a checkpoint whose state shapes differ from this run's (another model size)."""
    saved = meta.get("state_shapes")
    if saved is not None and saved != _shape_signature(fresh):
        raise ResumeMismatch(
            f"the checkpoint at step {step} in {directory} holds a train state of other shapes than this run's "
            "(a different model or adapter size); use a new output_dir or the run's original model"
        )


def apply_budget_change(trainer: Any, meta: dict, step: int) -> Any:
    """A resumed run with another ``rank_budget``: refuse one below the total rank, else move ``budget_left``."""
    state = trainer.state
    old = meta.get("rank_budget")
    new = trainer.rank_budget
    if old is None or int(old) == new:
        return state
    method = getattr(trainer, "method_impl", None)
    if method is not None and not method.setup.grow:  # e.g. adalora: its schedule reads the budget, masks stay
        _log(f"rank budget changed from {old} to {new} on resume (step {step}); {trainer.method} aims at it from now")
        return state
    total = int(np.asarray(jax.device_get(state["alloc"]["rank"])).sum())
    if new < total:
        raise ResumeMismatch(
            f"adapter.rank_budget={new} is below the total rank {total} already reached at step {step} in "
            f"{trainer.checkpointer.directory} (saved with rank_budget={old}); use a budget >= {total} or a new "
            "output_dir"
        )
    alloc = dict(state["alloc"])
    capacity = alloc_lib.rank_capacity(new, len(trainer.model.targets), trainer.num_slots)
    budget_left = jnp.asarray(capacity - total, alloc["budget_left"].dtype)
    committed, reserve = alloc_lib.masks_from_rank(alloc["rank"], trainer.num_slots, budget_left)
    alloc.update(budget_left=budget_left, committed=committed, reserve=reserve)
    _log(f"rank budget changed from {old} to {new} on resume (total rank {total} at step {step})")
    state = dict(state, alloc=alloc)
    return jax.device_put(state, trainer.state_shardings(state))


def require_finite(state: Any, step: int, what: str) -> None:
    """Raise ``Diverged`` rather than save or export a train state with NaN/inf."""
    if not state_is_finite({"trainable": state["trainable"], "opt_state": state["opt_state"]}):
        raise Diverged(f"training diverged: the train state at step {step} holds NaN or inf values; the {what} "
                       "was not written; lower optim.learning_rate and rerun")


def save_or_fail(checkpointer: Any, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """``checkpointer.save`` (``metrics`` rank it for the best-checkpoint policy), OS errors as one line."""
    quiet_orbax_failures()
    try:
        checkpointer.save(step, state, meta, metrics=metrics)
    except Exception as err:  # noqa: BLE001 - orbax wraps the OS error in various types
        os_err = os_error_in_chain(err)
        if os_err is None:
            raise
        raise OutputWriteError(f"checkpoint for step {step} not saved: "
                               f"{describe_os_error(os_err, Path(checkpointer.directory) / str(step))}") from None


def stop_agreed(requested: bool, sync_point: bool) -> bool:
    """Whether to stop now: this process's request alone, or with several processes any process's request at a
    step where all processes sync anyway (log steps), so that all stop at the same step."""
    if jax.process_count() == 1:
        return requested
    if not sync_point:
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([int(requested)], np.int32))
    return bool(np.asarray(flags).any())


def preempted(signal_name: str, step: int, checkpointer: Any) -> None:
    """Raise ``Preempted`` after the stop checkpoint is written."""
    raise Preempted(f"{signal_name}: stopped after step {step} and saved a checkpoint at step {step} in "
                    f"{checkpointer.directory}; rerun the same command to resume")


