"""Resume identity by content: a fingerprint of the backbone checkpoint instead of its path string.

The fingerprint is the SHA-256 of ``config.json`` and, for every weight file (``*.safetensors``, ``*.bin``,
``*.msgpack``, ``*.h5``), its size and the SHA-256 of its first and last MiB (headers, shapes and the first and
last tensors), sorted so that the file names do not matter. It is cheap on multi-GB checkpoints; two weight
files of equal size that differ only in the middle would not be told apart. A run writes it to
``output_dir/backbone.json``; a rerun with checkpoints must present the same fingerprint, whatever the path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from adapad_jax.config.schema import ConfigError

FINGERPRINT_FILE = "backbone.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".h5")
_EDGE = 1 << 20


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_EDGE))
        if size > 2 * _EDGE:
            handle.seek(size - _EDGE)
        digest.update(handle.read(_EDGE))
    return digest.hexdigest()


def backbone_fingerprint(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"config": sha256, "weights": [[size, edge sha256], ...]}`` of a local checkpoint directory."""
    directory = Path(checkpoint_dir)
    config = directory / "config.json"
    weights = sorted(
        [p.stat().st_size, _file_digest(p)] for p in directory.iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )
    return {
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": weights,
    }


def saved_fingerprint(output_dir: Path) -> dict[str, Any] | None:
    """The fingerprint a previous run wrote, or None (older runs, or none yet)."""
    path = Path(output_dir) / FINGERPRINT_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def check_backbone(output_dir: Path, checkpoint_dir: Any, name_or_path: str) -> bool:
    """Refuse (one line) a resume whose backbone differs in content; True when a fingerprint was compared."""
    saved = saved_fingerprint(output_dir)
    if saved is None:
        return False
    current = backbone_fingerprint(checkpoint_dir)
    if saved.get("config") != current["config"]:
        what = "a different config.json (another architecture or size)"
    elif saved.get("weights") != current["weights"]:
        what = "different weight files"
    else:
        return True
    raise ConfigError(
        f"output_dir '{output_dir}' holds a run of another backbone: model.name_or_path='{name_or_path}' has {what} "
        f"than the model it was trained from; use that model or another output_dir"
    )


def write_backbone_fingerprint(output_dir: Path, checkpoint_dir: Any) -> None:
    """Record the backbone's fingerprint in ``output_dir`` (a resume has already checked it is the same)."""
    from adapad_jax.outputs.output_set import write_json_atomic

    write_json_atomic(Path(output_dir) / FINGERPRINT_FILE, backbone_fingerprint(checkpoint_dir))


def normalise_model_path(name_or_path: str) -> str:
    """A local path made absolute and canonical (a trailing slash is not a change); hub ids unchanged."""
    if os.path.exists(name_or_path):
        return os.path.realpath(name_or_path)
    return name_or_path.rstrip("/")
