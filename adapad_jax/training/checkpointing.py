"""Orbax checkpoints of the train state plus a JSON metadata item (data position, L, ...)."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class _SkipMetricsWarning(logging.Filter):
    """Drop orbax's warning for a checkpoint saved without metrics (only evaluated steps carry metrics)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkipMetricsWarning())


class Checkpointer:
    """Saves ``{state, meta}`` under ``directory/<step>``; keeps the newest ``keep``; synchronous writes.

    Orbax writes each step to a temporary directory and renames it when complete, so a run
    killed mid-save leaves the previous checkpoint as the newest valid one.
    """

    def __init__(
        self, directory: str | Path, keep: int, *, read_only: bool = False, best: tuple[str, str] | None = None,
    ):
        """``read_only``: only restore; create nothing and leave another run's temporary directories alone.

        ``best`` = (metric key, ``"max"``/``"min"``): besides the newest ``keep``, the checkpoint whose saved
        metrics are best is kept out of rotation (``best_step``); checkpoints saved without metrics never are.
        """
        max_to_keep = keep if keep and keep > 0 and not read_only else None
        extra = {}
        if best is not None:
            extra = {"best_fn": _metric_getter(*best), "best_mode": best[1]}
            if max_to_keep is not None:
                extra["preservation_policy"] = _latest_and_best(max_to_keep, *best)
                max_to_keep = None  # orbax takes either max_to_keep or a preservation policy
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            **extra,
        )
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self.best = best
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Every complete checkpoint step, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
        """Write state and metadata (and the evaluation ``metrics``) for ``step``; a step already saved is skipped."""
        if self.read_only:
            raise RuntimeError(f"checkpoints in {self.directory} were opened read-only")
        if step in self.manager.all_steps():
            return
        try:
            self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True, metrics=metrics,
            )
            self.manager.wait_until_finished()
        except BaseException:
            self.discard_partial(step)
            raise

    def discard_partial(self, step: int) -> None:
        """Remove what a failed save of ``step`` left (orbax's ``<step>.orbax-checkpoint-tmp*``); the finished steps
        stay. Errors of the failed save's remaining work are dropped: the save's own error is the one reported."""
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.manager.reload()

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` onto the structure, shapes and shardings of ``like_state``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["meta"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON metadata of ``step``."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def best_step(self) -> int | None:
        """The saved step with the best metric (see ``best``); None when no checkpoint has metrics."""
        if self.best is None:  # orbax would answer latest_step()
            return None
        return self.manager.best_step()

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The evaluation metrics saved with ``step``, or None."""
        saved = self.manager.metrics(step)
        return None if saved is None else dict(saved)

    def close(self) -> None:
        """Finish pending work and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _metric_getter(key: str, mode: str) -> Callable[[dict[str, Any]], float]:
    """``metrics -> metrics[key]``, with NaN (an undefined metric) or a missing key ranked worst."""
    worst = -math.inf if mode == "max" else math.inf

    def get(metrics: dict[str, Any]) -> float:
        value = float(metrics.get(key, math.nan))
        return value if math.isfinite(value) else worst

    return get


def _latest_and_best(keep: int, key: str, mode: str) -> Any:
    """Keep the newest ``keep`` checkpoints and the one with the best ``key``."""
    policies = ocp.checkpoint_managers
    return policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_metric_getter(key, mode), reverse=mode == "min", n=1,
                       keep_checkpoints_without_metrics=False),
    ])
