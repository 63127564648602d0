"""The coordinator's loss, seen from the other processes of a multi-process run.

When process 0 (which hosts JAX's coordination service) dies, JAX's C++ client in every other process aborts it
(``LOG(FATAL)``: a C++ stack trace on stderr, SIGABRT, exit 134) within a second, before any Python code can run;
jaxlib takes no Python callback for it. So a process whose ``JAX_PROCESS_ID`` is not 0 runs the training command
in a child process and only watches it: the child's native stderr (fd 2: C++ and absl logging) comes through a pipe
and is relayed line by line, while its Python ``sys.stderr`` (errors, the progress bar) still writes to the
terminal or log directly. When the child dies of SIGABRT after that abort message, the trace is dropped and one
line naming process 0 ends this process with exit 69 (``failures.EXIT_PEER_LOST``); anything else is relayed as it
came and the child's exit code is this process's. SIGTERM / SIGINT sent to this process are passed on to the
child, which runs in a process group of its own so that a terminal's Ctrl-C reaches it once.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Mapping

CHILD_MARKER = "ADAPAD_SUPERVISED_STDERR_FD"  # set in the child: the fd of the terminal/log stderr
# The child's native lines from the first of these on are held back until it exits (or HOLD_SECONDS pass).
_HOLD_FROM = (b"Polled an error from coordination service", b"Terminating process because the JAX distributed")
_COORDINATOR_GONE = (b"Terminating process because the JAX distributed service detected fatal errors",
                     b"Failed to send RPC to coordination service")
HOLD_SECONDS = 5.0


def supervised_process(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(process id, process count) when this command should run under a supervisor, else None.

    That is a process other than 0 of an explicit multi-process run (``JAX_PROCESS_ID``); the child itself and
    a run with ``ADAPAD_DISTRIBUTED=auto`` (whose process id JAX finds later) are not.
    """
    if environ.get(CHILD_MARKER):
        return None
    try:
        process, count = int(environ.get("JAX_PROCESS_ID", "")), int(environ.get("JAX_NUM_PROCESSES", ""))
    except ValueError:
        return None  # distributed.distributed_settings reports bad values in the run itself
    return (process, count) if 0 < process < count and environ.get("JAX_COORDINATOR_ADDRESS") else None


def coordinator_lost(returncode: int, native: bytes) -> bool:
    """The child was aborted by JAX's client because the coordination service (process 0) stopped answering."""
    return returncode == -signal.SIGABRT and all(text in native for text in _COORDINATOR_GONE)


def supervise_if_worker() -> None:
    """In a process other than 0: run this command in a child and exit with its code (never returns). In the
    child: send Python's stderr to the real stderr, leaving fd 2 to the supervisor's pipe. Otherwise nothing."""
    fd = os.environ.get(CHILD_MARKER)
    if fd:
        _become_child(int(fd))
        return
    placement = supervised_process(os.environ)
    if placement is not None:
        sys.exit(_supervise(*placement))


def _become_child(stderr_fd: int) -> None:
    _die_with_parent()
    sys.stderr.flush()
    sys.stderr = os.fdopen(stderr_fd, "w", encoding=sys.stderr.encoding, errors=sys.stderr.errors,
                           buffering=1)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child when its supervisor dies (Linux), as a shared process group would."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _supervise(process: int, count: int) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    child = subprocess.Popen(
        [sys.executable, *sys.orig_argv[1:]], env={**os.environ, CHILD_MARKER: str(terminal)},
        stderr=subprocess.PIPE, pass_fds=(terminal,), process_group=0,
    )
    os.close(terminal)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    held = _relay(child.stderr.fileno())
    returncode = child.wait()
    if coordinator_lost(returncode, held):
        from adapad_jax.runtime.distributed import lost_line

        print(lost_line(0, count, process, "the coordinator, which hosts JAX's coordination service, stopped "
                                           "answering"), file=sys.stderr, flush=True)
        from adapad_jax.runtime.failures import EXIT_PEER_LOST

        return EXIT_PEER_LOST
    _write(held)
    if returncode < 0:
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
        return 128 - returncode
    return returncode


def _relay(fd: int) -> bytes:
    """Copy the child's native stderr to ours line by line until it closes; return the lines held back at the end."""
    pending, held, hold_until = b"", b"", None
    while True:
        timeout = None if hold_until is None else max(0.0, hold_until - time.monotonic())
        if not select.select([fd], [], [], timeout)[0]:
            _write(held)  # the child lived on: what was held was not its end
            held, hold_until = b"", None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return held + pending
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            line += b"\n"
            if hold_until is None and any(text in line for text in _HOLD_FROM):
                hold_until = time.monotonic() + HOLD_SECONDS
            if hold_until is None:
                _write(line)
            else:
                held += line


def _write(data: bytes) -> None:
    if data:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
