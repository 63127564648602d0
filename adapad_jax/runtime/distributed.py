"""JAX's multi-process runtime: when to start it (from the environment), which process writes, and what happens
when a process of the run is lost.

A lost process (killed, its host gone) is noticed by a watch thread in every process: each process sets a
heartbeat key in JAX's coordination service every ``timeout / 8`` seconds and reads the others'; a peer whose
heartbeat has not moved for ``ADAPAD_PEER_TIMEOUT`` seconds (default 60) ends this process with one line naming
it and exit 69 (``failures.EXIT_PEER_LOST``). JAX's own heartbeat timeout, which aborts the process from C++
(exit 134), is set to twice that plus 10 s, so the watch speaks first. A process that exits in order marks itself
done and is not waited for.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import sys
import threading
import time
from typing import Any, Mapping

from adapad_jax.runtime.failures import EXIT_PEER_LOST, ConfigError

# The three variables that start JAX's multi-process runtime (see initialize_distributed).
DISTRIBUTED_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Set to "auto" to let jax.distributed.initialize() detect a cluster (SLURM, Open MPI, Kubernetes, TPU pods).
DISTRIBUTED_AUTO_VAR = "ADAPAD_DISTRIBUTED"
# Seconds without a heartbeat after which a process of the run counts as lost.
PEER_TIMEOUT_VAR = "ADAPAD_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 60.0
_HEARTBEAT_KEY = "adapad/heartbeat/"
_DONE = "done"


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


def peer_timeout(environ: Mapping[str, str]) -> float:
    """``ADAPAD_PEER_TIMEOUT`` (seconds, > 0; default 60): how long a silent process is waited for."""
    text = environ.get(PEER_TIMEOUT_VAR, "").strip()
    if not text:
        return DEFAULT_PEER_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{PEER_TIMEOUT_VAR}={text!r} must be a positive number of seconds")
    return value


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's multi-process runtime when the environment asks for it (before any device use) and the watch for
    lost processes; True if started."""
    environ = os.environ if environ is None else environ
    settings = distributed_settings(environ)
    if settings is None:
        return False
    timeout = peer_timeout(environ)
    import jax

    jax.distributed.initialize(**settings, heartbeat_timeout_seconds=int(math.ceil(2 * timeout)) + 10)
    if jax.process_count() > 1:
        _start_peer_watch(timeout)
    return True


class PeerWatch:
    """The heartbeat thread of one process (see the module docstring)."""

    def __init__(self, client: Any, process: int, count: int, timeout: float):
        self.client, self.process, self.count, self.timeout = client, process, count, timeout
        self.interval = min(max(timeout / 8, 0.1), 5.0)
        self._stop = threading.Event()
        self._beats = 0
        self._heard: dict[int, tuple[str | None, float]] = {}

    def start(self) -> None:
        """Beat once (so that the others hear this process at once), then keep beating in a daemon thread."""
        self._beat()
        threading.Thread(target=self._run, name="adapad-peer-watch", daemon=True).start()
        atexit.register(self.leave)

    def leave(self) -> None:
        """Stop beating and tell the others that this process ended in order (not lost)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.client.key_value_set(f"{_HEARTBEAT_KEY}{self.process}", _DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing to tell then
            pass

    def _beat(self) -> dict[str, str]:
        self._beats += 1
        self.client.key_value_set(f"{_HEARTBEAT_KEY}{self.process}", str(self._beats), allow_overwrite=True)
        return dict(self.client.key_value_dir_get(_HEARTBEAT_KEY))

    def silent_peer(self, beats: Mapping[str, str], now: float) -> int | None:
        """The first other process whose heartbeat has not moved for ``timeout`` seconds, or None."""
        for peer in range(self.count):
            value = beats.get(f"{_HEARTBEAT_KEY}{peer}")
            if peer == self.process or value == _DONE:
                continue
            last = self._heard.get(peer)
            if last is None or last[0] != value:
                self._heard[peer] = (value, now)
            elif now - last[1] > self.timeout:
                return peer
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                beats = self._beat()
            except Exception as err:  # noqa: BLE001 - the coordination service itself is gone
                if self._stop.is_set():
                    return
                self._lost(0, f"the coordination service stopped answering ({' '.join(str(err).split())[:160]})")
            peer = self.silent_peer(beats, time.monotonic())
            if peer is not None and not self._stop.is_set():
                self._lost(peer, f"no heartbeat for {self.timeout:g} s ({PEER_TIMEOUT_VAR})")

    def _lost(self, peer: int, why: str) -> None:
        print(lost_line(peer, self.count, self.process, why), file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)


def lost_line(peer: int, count: int, process: int, why: str) -> str:
    """The one line with which ``process`` stops because ``peer`` of the ``count``-process run is gone."""
    return (f"error: process {peer} of this {count}-process run was lost: {why}; process {process} stops too. "
            "Rerun the same command on every process: it resumes from the newest checkpoint")


_WATCH: PeerWatch | None = None


def _start_peer_watch(timeout: float) -> None:
    global _WATCH
    from jax._src import distributed as jax_distributed  # the runtime's client: its key-value store

    state = jax_distributed.global_state
    _WATCH = PeerWatch(state.client, state.process_id, state.num_processes, timeout)
    _WATCH.start()


def leave_peers() -> None:
    """Tell the other processes that this one ends in order (before an ``os._exit``); nothing without a watch."""
    if _WATCH is not None:
        _WATCH.leave()


# A collective whose peer process died fails at once in the process that waits on it (Gloo: "Connection closed
# by peer"); the watch names the lost process a moment later.
_PEER_FAILURE = re.compile(r"Connection (closed|reset) by peer|Gloo .* failed|Socket closed|UNAVAILABLE")


def await_peer_verdict(err: BaseException) -> None:
    """After ``err`` in a multi-process run: if it looks like a collective that lost its peer, give the watch up to
    its timeout to end the process with the line naming that peer; returns when no process turns out lost."""
    watch = _WATCH
    if watch is None or watch._stop.is_set() or not _PEER_FAILURE.search(str(err)):
        return
    time.sleep(watch.timeout + 4 * watch.interval)  # the watch ends the process from its own thread


def is_main_process() -> bool:
    """True on the process that writes files and logs (process 0; the only one without jax.distributed)."""
    import jax

    return jax.process_index() == 0
