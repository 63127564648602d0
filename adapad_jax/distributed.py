"""JAX's multi-process runtime: when to start it (from the environment) and which process writes."""

from __future__ import annotations

import os
from typing import Any, Mapping

from adapad_jax.config import ConfigError

# The three variables that start JAX's multi-process runtime (see initialize_distributed).
DISTRIBUTED_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Set to "auto" to let jax.distributed.initialize() detect a cluster (SLURM, Open MPI, Kubernetes, TPU pods).
DISTRIBUTED_AUTO_VAR = "ADAPAD_DISTRIBUTED"


def distributed_settings(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """Arguments for ``jax.distributed.initialize`` from the environment; None for a single-process run.

    Explicit: all of ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Cluster auto-detection: ``ADAPAD_DISTRIBUTED=auto`` and none of the three.
    """
    present = [name for name in DISTRIBUTED_ENV_VARS if environ.get(name)]
    auto = environ.get(DISTRIBUTED_AUTO_VAR, "").strip().lower()
    if auto not in ("", "auto"):
        raise ConfigError(f"{DISTRIBUTED_AUTO_VAR}={auto!r} is not understood: set it to 'auto' or leave it unset")
    if not present:
        return {} if auto == "auto" else None
    if len(present) != len(DISTRIBUTED_ENV_VARS):
        missing = [name for name in DISTRIBUTED_ENV_VARS if name not in present]
        raise ConfigError(
            f"multi-process run: {', '.join(present)} set but {', '.join(missing)} missing; set all three"
        )
    try:
        num_processes, process_id = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except ValueError:
        raise ConfigError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"JAX_PROCESS_ID={process_id} is not in [0, JAX_NUM_PROCESSES={num_processes})")
    return {
        "coordinator_address": environ["JAX_COORDINATOR_ADDRESS"],
        "num_processes": num_processes,
        "process_id": process_id,
    }


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's multi-process runtime when the environment asks for it (before any device use); True if started."""
    settings = distributed_settings(os.environ if environ is None else environ)
    if settings is None:
        return False
    import jax

    jax.distributed.initialize(**settings)
    return True


def is_main_process() -> bool:
    """True on the process that writes files and logs (process 0; the only one without jax.distributed)."""
    import jax

    return jax.process_index() == 0
