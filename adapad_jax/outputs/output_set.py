"""Outputs written as a set, strict JSON and the user's umask.

``publish_set`` writes every end-of-run output (eval_results.json, predictions.jsonl, adapter/, ranks.json, ...)
into one staging directory inside ``output_dir`` and only then swaps them into place, moving the previous
versions to a backup directory that is restored if any swap fails. A failure while writing (disk full,
read-only directory) therefore leaves the previous set untouched and ends in one line naming the path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from adapad_jax.runtime.failures import OutputWriteError, describe_os_error, os_error_in_chain


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and everything below a directory) the modes a plain open()/mkdir() would: 0o666/0o777 & ~umask.

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 regardless of the umask.
    """
    mask = current_umask()
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for item in items:
        if item.is_symlink():
            continue
        mode = 0o777 if item.is_dir() else 0o666
        if not item.is_dir() and os.stat(item).st_mode & stat.S_IXUSR:
            mode = 0o777
        os.chmod(item, mode & ~mask)


def finite_or_none(value: Any) -> Any:
    """Replace NaN/inf floats anywhere in a JSON-like value by None (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars / arrays
        return finite_or_none(value.tolist())
    return value


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes the non-standard ``NaN``/``Infinity`` tokens (they become null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _move_aside(target: Path, backup: Path) -> bool:
    if target.exists() or target.is_symlink():
        os.replace(target, backup / target.name)
        return True
    return False


def swap_in(staging: Path, names: Iterable[str], target_dir: Path) -> None:
    """Move ``staging/<name>`` onto ``target_dir/<name>`` for every name present, all or none."""
    names = [name for name in names if (staging / name).exists()]
    backup = Path(tempfile.mkdtemp(dir=target_dir, prefix=".outputs-previous-"))
    done: list[tuple[str, bool]] = []
    try:
        for name in names:
            had = _move_aside(target_dir / name, backup)
            done.append((name, had))
            os.replace(staging / name, target_dir / name)
    except BaseException:
        for name, had in reversed(done):
            if (target_dir / name).exists() and not (staging / name).exists():
                os.replace(target_dir / name, staging / name)
            if had:
                os.replace(backup / name, target_dir / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def publish_set(output_dir: Path, names: Iterable[str], write: Callable[[Path], None],
                target_dir: Path | None = None) -> None:
    """``write(staging)`` then swap the named outputs into ``target_dir`` (default ``output_dir``) together.

    An OSError while writing or swapping becomes ``OutputWriteError`` (one line); the previous outputs stay.
    """
    target_dir = output_dir if target_dir is None else target_dir
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".outputs-staging-"))
        write(staging)
        apply_umask(staging)
        target_dir.mkdir(parents=True, exist_ok=True)
        swap_in(staging, names, target_dir)
    except Exception as err:  # noqa: BLE001 - writers (safetensors, matplotlib) wrap the OS error
        os_err = os_error_in_chain(err)
        if os_err is None:
            raise
        where = os_err.filename or target_dir  # (the staging directory is gone by then)
        raise OutputWriteError(
            f"outputs not written, the previous ones are intact: {describe_os_error(os_err, where)}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented) through ``write_text_atomic``."""
    write_text_atomic(path, dumps_strict(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line through ``write_text_atomic``."""
    write_text_atomic(path, "".join(dumps_strict(row) + "\n" for row in rows))
