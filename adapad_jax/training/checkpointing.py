"""Orbax checkpoints of the train state plus a JSON metadata item (data position, L, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves ``{state, meta}`` under ``directory/<step>``; keeps the newest ``keep``; synchronous writes.

    Orbax writes each step to a temporary directory and renames it when complete, so a run
    killed mid-save leaves the previous checkpoint as the newest valid one.
    """

    def __init__(self, directory: str | Path, keep: int, *, read_only: bool = False):
        """``read_only``: only restore; create nothing and leave another run's temporary directories alone."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 and not read_only else None,
            create=not read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
        )
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Every complete checkpoint step, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write state and metadata for ``step`` (overwrites nothing; a step already saved is skipped)."""
        if self.read_only:
            raise RuntimeError(f"checkpoints in {self.directory} were opened read-only")
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

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

    def close(self) -> None:
        """Finish pending work and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
