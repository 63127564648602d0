"""On-disk cache of tokenised features, so a re-run or a resume skips tokenisation.

An entry is one ``.npz`` file named by a SHA-256 key over everything the features depend on: the raw split's
``datasets`` fingerprint (content-derived for in-memory rows, file path + modification time for local files,
revision for the hub), the tokenizer (its full serialised pipeline and padding settings), the task, the split
and the preprocessing settings. Files are written to a temporary name and renamed, so a crash or another
process writing the same entry never leaves a half-written file under the final name; a file that cannot be
read is ignored and rewritten.

Location: ``data.cache_dir``, else ``$ADAPAD_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/adapad_jax/features``
(``~/.cache/adapad_jax/features``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$ADAPAD_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/adapad_jax/features`` (``~/.cache/...``)."""
    if os.environ.get("ADAPAD_FEATURE_CACHE"):
        return Path(os.environ["ADAPAD_FEATURE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adapad_jax" / "features"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the serialised fast-tokenizer pipeline (vocab, normaliser,
    pre-tokeniser, post-processor, minus per-call truncation/padding state), padding side and pad id; slow
    tokenizers fall back to their class, name and vocabulary."""
    state: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
        "special_tokens": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        state["pipeline"] = pipeline
    else:
        state["name_or_path"] = getattr(tokenizer, "name_or_path", "")
        state["vocab"] = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(dataset: Any, tokenizer_hash: str, **settings: Any) -> str | None:
    """The entry key for tokenising ``dataset`` with these settings; None when the dataset has no fingerprint."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        return None
    parts = {"version": FORMAT_VERSION, "dataset": fingerprint, "rows": len(dataset), "tokenizer": tokenizer_hash,
             **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load(cache_dir: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of entry ``key``, or None when it is absent or unreadable."""
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except Exception:  # noqa: BLE001 - a truncated or foreign file is a cache miss, not an error
        return None


def save(cache_dir: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write entry ``key`` atomically; a cache that cannot be written is skipped silently."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, **arrays)
            os.replace(tmp, cache_dir / f"{key}.npz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return


def cached(
    cache_dir: Path | None, dataset: Any, tokenizer_hash: str, settings: Mapping[str, Any],
    compute: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """``compute()``'s arrays, from the cache when an entry exists (``cache_dir`` None: no caching)."""
    key = cache_key(dataset, tokenizer_hash, **settings) if cache_dir is not None else None
    if key is None:
        return compute()
    arrays = load(cache_dir, key)
    if arrays is None:
        arrays = compute()
        save(cache_dir, key, arrays)
    return arrays
