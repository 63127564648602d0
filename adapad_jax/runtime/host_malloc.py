"""glibc malloc settings that keep XLA:CPU's large step temporaries mapped between steps.

XLA:CPU allocates a step's temporaries (2.6 GB for a Qwen3-0.6B forward+backward at batch 4 x 128) with
malloc and frees them when the step ends. Under glibc's defaults a block that large is an ``mmap`` of its own
(XLA's worker threads allocate from per-thread arenas, which cannot hold it, so they fall back to ``mmap`` even
when ``M_MMAP_MAX`` is 0), so every step faults all of its pages in again: 664,724 minor faults and 12% of a
Qwen3 training step on one core (docs/BENCHMARKS.md §2). One arena, no ``mmap`` for large blocks and a trim
threshold above any step's temporaries make them come from the heap and stay there. glibc reads these
settings only when a process starts, so the training command re-executes itself once with them.

They keep freed host memory in the process: the step's high-water mark, which a training loop needs again at
the next step anyway, and whatever set-up freed (host copies of the weights, tokenisation), which
:func:`release_free_heap` hands back once, before the first step. ``ADAPAD_MALLOC=system`` keeps glibc's
defaults; a preloaded allocator (``LD_PRELOAD`` with tcmalloc / jemalloc), tunables of the user's own, a
non-glibc platform and an installed accelerator plugin (device buffers are not malloc's) are left alone.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Mapping

OPT_OUT = "ADAPAD_MALLOC"
TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=68719476736")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu",
                        "jax_plugins")


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):
        return False


def _accelerator_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def tuned_environment(environ: Mapping[str, str], glibc: bool, accelerator: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None when this process should keep the allocator it has."""
    if not glibc or environ.get(OPT_OUT, "").lower() == "system":
        return None
    if "malloc" in environ.get("LD_PRELOAD", ""):
        return None
    platforms = environ.get("JAX_PLATFORMS", "")
    if accelerator and platforms.split(",")[0].strip() != "cpu":
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in existing:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [existing, *TUNABLES]))}


def cpu_worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the tunables a training run gets, for a child process that runs JAX on the CPU."""
    return tuned_environment(environ, _glibc(), accelerator=False) or dict(environ)


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``); False where there is no glibc.

    Under :data:`TUNABLES` nothing is trimmed on its own, so memory that set-up freed would stay resident for the
    whole run; the training loop calls this once before its first step.
    """
    if not _glibc():
        return False
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)
    return True


def reexec_with_tuned_malloc() -> None:
    """Replace this process by the same command under :data:`TUNABLES` (returns only when nothing is to change).

    Call it first thing in a process entry point, never from code a user imports: it does not return.
    """
    env = tuned_environment(os.environ, _glibc(), _accelerator_plugin_installed())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
