"""``train.profile_start_step`` / ``train.profile_num_steps``: a window of train steps traced with ``jax.profiler``.

The trace goes to ``<output_dir>/profile`` (``run.PROFILE_DIR``) as ``plugins/profile/<time>/<host>.xplane.pb``
(TensorBoard's profile plugin: ``tensorboard --logdir <output_dir>/profile``) and ``perfetto_trace.json.gz``
(open it at https://ui.perfetto.dev). Only process 0 traces. The last traced step is waited for before the
trace stops, so its device work is in the trace.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import jax

from adapad_jax.config.validation import check_profile_window


class StepProfiler:
    """Traces 1-based steps ``start`` .. ``start + count - 1`` of a run; ``start = 0`` traces nothing."""

    def __init__(self, directory: Path, start: int, count: int, enabled: bool = True):
        self.directory = Path(directory)
        self.first, self.last = int(start), int(start) + int(count) - 1
        self.enabled = enabled and self.first > 0
        self.active = False
        self._outputs: Any = None

    def before_step(self, step: int) -> None:
        """Start the trace if step ``step`` (1-based, about to run) is the first of the window still to run."""
        if self.enabled and not self.active and self.first <= step <= self.last:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, outputs: Any) -> None:
        """Note the step's ``outputs`` (waited for before stopping); stop after the window's last step."""
        if self.active:
            self._outputs = outputs
            if step >= self.last:
                self.stop()

    def stop(self) -> None:
        """Wait for the last traced step's outputs, then write the trace (no-op when not tracing)."""
        if not self.active:
            return
        try:
            if self._outputs is not None:
                jax.block_until_ready(self._outputs)
        finally:
            self._outputs = None
            self.active = False
            jax.profiler.stop_trace()


@contextlib.contextmanager
def step_profiler(start: int, count: int, run_dir: Path, num_steps: int, enabled: bool) -> Iterator[StepProfiler]:
    """The run's ``StepProfiler`` (``train.profile_start_step``, ``train.profile_num_steps``); the trace is stopped on
    the way out, whatever happens."""
    from adapad_jax.outputs.layout import PROFILE_DIR

    if start > 0:
        check_profile_window(start, count, num_steps)
    profiler = StepProfiler(Path(run_dir) / PROFILE_DIR, start, count, enabled)
    try:
        yield profiler
    finally:
        profiler.stop()
