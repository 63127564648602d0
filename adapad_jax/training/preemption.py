"""SIGTERM / SIGINT during training: finish the step, checkpoint it, exit 75; a second signal exits at once.

``stop_requests()`` installs the handlers for the training loop (main thread only) and restores the previous
ones afterwards. Outside the loop, ``launch/train.py`` installs ``exit_on_signal`` so that a signal during
model loading, evaluation or export ends the run with one line instead of a KeyboardInterrupt traceback. Once a
command's outputs are complete, ``install_finished_handlers`` makes a late signal (during the interpreter's
shutdown) end the process at once with exit 0 and nothing printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

from adapad_jax.runtime.failures import EXIT_OK, EXIT_PREEMPTED, Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A process under adapad_jax/runtime/supervise.py can get one signal twice: from a scheduler that signals every process of
# the job, and forwarded by its supervisor. The same signal again within this many seconds is that copy, not a
# second request.
DUPLICATE_SECONDS = 1.0
_SUPERVISED_MARKER = "ADAPAD_SUPERVISED_STDERR_FD"  # supervise.CHILD_MARKER (not imported: this module stays light)


def _duplicate(signum: int, first: tuple[int, float] | None) -> bool:
    """``signum`` repeats the ``first`` (signal, time) a moment later in a supervised child: a forwarded copy."""
    return (first is not None and first[0] == signum and time.monotonic() - first[1] < DUPLICATE_SECONDS
            and bool(os.environ.get(_SUPERVISED_MARKER)))


class StopRequest:
    """Set by the first SIGTERM/SIGINT; the training loop polls ``requested`` after each step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first: tuple[int, float] | None = None

    @property
    def requested(self) -> bool:
        """True once a signal has arrived."""
        return self.signal_name is not None

    def handle(self, signum: int, _frame) -> None:
        """First signal: remember it. Second: exit at once (a checkpoint being written is left unfinished)."""
        name = signal.Signals(signum).name
        if _duplicate(signum, self._first):
            return
        if self.signal_name is not None:
            _exit_now(f"{name} again: stopping at once without saving")
        self.signal_name, self._first = name, (signum, time.monotonic())
        print(f"{name} received: finishing the current step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


def _exit_now(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PREEMPTED)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Within the block the first SIGTERM/SIGINT only sets ``StopRequest.requested``."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, request.handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_on_signal(signum: int, _frame) -> None:
    """Handler outside the training loop: raise ``Preempted`` once (no traceback), exit at once the next time."""
    name = signal.Signals(signum).name
    first = (signum, time.monotonic())

    def again(s: int, _f) -> None:
        if not _duplicate(s, first):
            _exit_now(f"{signal.Signals(s).name} again: stopping at once")

    for sig in SIGNALS:
        signal.signal(sig, again)
    raise Preempted(f"{name} received outside training: stopped; nothing new was saved, rerun to resume")


def install_exit_on_signal() -> None:
    """Make SIGTERM/SIGINT outside the training loop end the run with one line (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, exit_on_signal)


def _exit_finished(_signum: int, _frame) -> None:
    """A signal after the outputs are complete: nothing is left to save or lose; end now, exit 0."""
    from adapad_jax.runtime.distributed import leave_peers

    leave_peers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_OK)


def install_finished_handlers() -> None:
    """After a command's work is done: a late SIGTERM/SIGINT (e.g. during interpreter shutdown) exits 0 quietly."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _exit_finished)
