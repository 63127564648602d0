"""One run per output_dir: an exclusive ``flock`` on ``output_dir/.adapad.lock`` held for the run's life.

The lock file records ``{"pid", "host", "started"}`` of its holder. A held lock refuses the second run with one
line. A lock file left by a process that is gone (same host, pid not running) is taken over with a message; on
filesystems where ``flock`` is not shared between hosts, a record from another host is refused with the path
to remove if that run is known to be dead. With several processes only process 0 takes the lock and the
others learn the outcome from it, so all of them stop together.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from adapad_jax.config.schema import ConfigError

LOCK_FILE = ".adapad.lock"


class OutputDirInUse(ConfigError):
    """Another live run holds the output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def _read_holder(fd: int) -> dict[str, Any]:
    """The pid/host record in an open lock file ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_or_refuse(fd: int, path: Path) -> None:
    """Take the exclusive lock on ``fd`` without waiting; ``OutputDirInUse`` naming the holder when a run has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise OutputDirInUse(
            f"output_dir '{path.parent}' is in use by another run ({_describe(_read_holder(fd))}); wait for it "
            "to finish or choose another output_dir"
        ) from None


class RunLock:
    """``with RunLock(output_dir): ...``; ``acquire`` raises ``OutputDirInUse`` when another run holds it."""

    def __init__(self, output_dir: str | os.PathLike, log=None):
        self.path = Path(output_dir) / LOCK_FILE
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``OutputDirInUse`` (one line naming the holder)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock_or_refuse(fd, self.path)
            holder = _read_holder(fd)
            host, pid = socket.gethostname(), os.getpid()
            if holder.get("pid") and holder.get("pid") != pid:
                same_host = holder.get("host") == host
                if not same_host:
                    raise OutputDirInUse(
                        f"output_dir '{self.path.parent}' is locked by a run on another host ({_describe(holder)}); "
                        f"if that run is gone, remove {self.path} and rerun"
                    )
                state = "pid reused" if _pid_alive(int(holder["pid"])) else "not running"
                self.log(f"taking over the lock of {self.path.parent} left by a run that ended without releasing "
                         f"it ({_describe(holder)}, {state})")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": pid, "host": host, "started": time.time()}).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Clear the record and drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_if_held(output_dir: str | os.PathLike) -> None:
    """Early check (creates nothing): raise ``OutputDirInUse`` when a live run holds ``output_dir``'s lock."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        try:
            _lock_or_refuse(fd, path)
        except OSError:
            return  # a lock file this process cannot lock is left to the real acquire to report
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def acquire_for_all_processes(output_dir: Path, log=None) -> RunLock | None:
    """Process 0 takes the lock; every process raises the same ``OutputDirInUse`` if it could not."""
    import jax

    lock, message = None, ""
    if jax.process_index() == 0:
        lock = RunLock(output_dir, log)
        try:
            lock.acquire()
        except OutputDirInUse as err:
            lock, message = None, str(err)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(1 if message else 0))
        if int(failed) and not message:
            message = f"output_dir '{output_dir}' is in use by another run (process 0 could not take its lock)"
    if message:
        raise OutputDirInUse(message)
    return lock
