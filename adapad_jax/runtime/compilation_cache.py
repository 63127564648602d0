"""JAX's persistent compilation cache for real runs, so a resume or a second run does not recompile.

``compilation_cache_dir`` in the config: a directory (default ``$ADAPAD_COMPILATION_CACHE`` when set, else
``$XDG_CACHE_HOME/adapad_jax/jax_compilation`` or ``~/.cache/adapad_jax/jax_compilation``); ``""`` turns it off.
JAX keys entries by the program, the compiler flags, the backend and the versions, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "ADAPAD_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """The default ``compilation_cache_dir``: ``$ADAPAD_COMPILATION_CACHE`` if set (may be "" = off), else user cache."""
    if CACHE_ENV_VAR in os.environ:
        return os.environ[CACHE_ENV_VAR]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "adapad_jax", "jax_compilation")


def enable_persistent_cache(directory: str, *, every_program: bool = False) -> bool:
    """Point JAX's compilation cache at ``directory`` (created if needed); no-op for ""; True when enabled.

    Call before the first compile: JAX reads the setting when it first compiles a program. ``every_program``
    also caches programs that compile fast (JAX's default skips those), for tests that build many small ones.
    """
    if not directory:
        return False
    import jax

    Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    if every_program:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True
