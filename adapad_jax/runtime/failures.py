"""Exit codes shared by the launch scripts, and the run-time failures that map onto them.

0 ok; 1 unexpected crash (a traceback: a bug); 2 bad input (config, model, data, an output_dir in use by
another run, a checkpoint from a different run); 3 training diverged (non-finite loss or gradients);
69 a process of a multi-process run was lost (rerun the same command to resume); 74 an output could not be
written (disk full, read-only directory); 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the same
command to resume), or a checkpoint being read was rotated away (retry).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the problem."""


EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PEER_LOST = 69  # sysexits EX_UNAVAILABLE: another process of the run is gone (the rerun resumes)
EXIT_OUTPUT_ERROR = 74  # sysexits EX_IOERR
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: try again (the rerun resumes)


class RunFailure(Exception):
    """A failure during a run that is reported as one line with its own exit code."""

    exit_code = EXIT_CRASH


class Diverged(RunFailure):
    """The loss or the gradients became NaN or inf."""

    exit_code = EXIT_DIVERGED


class Preempted(RunFailure):
    """SIGTERM or SIGINT arrived; the message says what was saved."""

    exit_code = EXIT_PREEMPTED


class CheckpointMoved(RunFailure):
    """A checkpoint that export / predict was reading was removed (rotated away by the running training): retry."""

    exit_code = EXIT_PREEMPTED  # EX_TEMPFAIL: the same command, run again, picks a checkpoint that is there


class OutputWriteError(RunFailure):
    """An output (checkpoint, results, adapter) could not be written; previous outputs are intact."""

    exit_code = EXIT_OUTPUT_ERROR


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def describe_os_error(err: BaseException, path: str | os.PathLike) -> str:
    """One line for an OSError while writing ``path``: disk full (with the free space), read-only, ...."""
    code = getattr(err, "errno", None)
    where = getattr(err, "filename", None) or path
    if code == errno.ENOSPC:
        try:
            free = shutil.disk_usage(_existing_parent(Path(where))).free
            space = f" ({free / 2**20:.1f} MiB free there)"
        except OSError:
            space = ""
        return f"no space left on the device writing {where}{space}; free some space and rerun"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where}: {os.strerror(code)}; make it writable or choose another output_dir"
    if code == errno.ENOTDIR:
        return f"cannot write {where}: a part of that path is a regular file, not a directory"
    reason = os.strerror(code) if code else str(err)
    return f"cannot write {where}: {reason}"


# How storage layers below Python report an OS error in their message: tensorstore (orbax's array writes)
# ``... No space left on device [os_error_code='28']``, Rust's std::io (safetensors) ``... (os error 28)``.
_STORAGE_ERRNO = re.compile(r"os_error_code='?(\d+)'?|\(os error (\d+)\)")


def storage_os_error(err: BaseException) -> OSError | None:
    """The OSError a storage layer's own exception (tensorstore ``ValueError: RESOURCE_EXHAUSTED``, safetensors'
    ``SafetensorError``) reports in its message, or None."""
    match = _STORAGE_ERRNO.search(str(err))
    if match is None:
        return None
    code = int(match.group(1) or match.group(2))
    return OSError(code, os.strerror(code)) if code else None


def os_error_in_chain(err: BaseException) -> OSError | None:
    """The first OSError among ``err`` and its causes/contexts (orbax wraps the real one), also one that a storage
    layer reports only in its message (``storage_os_error``), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and getattr(err, "errno", None):
            return err
        reported = None if isinstance(err, OSError) else storage_os_error(err)
        if reported is not None:
            return reported
        err = err.__cause__ or err.__context__
    return None
