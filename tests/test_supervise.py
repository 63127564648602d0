"""The supervisor of a process other than 0 (adapad_jax/runtime/supervise.py), on a small script in its place: exit codes
and signals passed through, native stderr relayed, and JAX's abort on a lost coordinator turned into one line.
The real abort (process 0 of two killed) is tests/test_multiprocess.py::test_a_killed_coordinator_*."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from adapad_jax.runtime import supervise
from adapad_jax.runtime.failures import EXIT_PEER_LOST

# What JAX 0.10.2's client writes to fd 2 before it aborts a process whose coordinator died (seen on two processes).
JAX_ABORT = (
    "E1202 10:19:51.115387    6532 coordination_service_agent.cc:289] Polled an error from coordination service "
    "(this can be an error from this or another task).\n"
    "F1202 10:19:51.115484    6532 client.h:80] Terminating process because the JAX distributed service detected "
    "fatal errors. This most likely indicates that another task died; see the other task logs for more details. "
    "absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
    "preempted/died/restarted unexpectedly or this task is experiencing network issues.\n"
    "*** Check failure stack trace: ***\n"
    "    @     0x7f3d01840634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n"
)

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from adapad_jax.runtime.supervise import supervise_if_worker

    supervise_if_worker()
    signal.signal(signal.SIGTERM, lambda s, f: (print("TERM in child", file=sys.stderr, flush=True), os._exit(75)))
    os.write(2, b"native line\\n")
    print("python line", file=sys.stderr, flush=True)
    mode = sys.argv[1]
    if mode == "abort":
        os.write(2, {abort!r}.encode())
        os.abort()
    if mode == "other-abort":
        os.write(2, b"F0000 something.cc:1] Check failed: x\\n")
        os.abort()
    if mode == "wait":
        print("ready", flush=True)
        time.sleep(60)
    if mode == "preempt":
        from adapad_jax.training.preemption import stop_requests

        with stop_requests() as request:
            print("ready", os.getpid(), flush=True)
            while not request.requested:
                time.sleep(0.01)
            time.sleep(0.5)  # the step finishes and its checkpoint is written
            print("saved", file=sys.stderr, flush=True)
        sys.exit(75)
    sys.exit(int(mode))
    """
).format(abort=JAX_ABORT)


def _start(tmp_path, mode: str, process_id: str = "1") -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)
    return subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}, (3, 4)),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"}, None),
        ({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, None),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "x", "JAX_PROCESS_ID": "1"}, None),
        ({"ADAPAD_DISTRIBUTED": "auto"}, None),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
          supervise.CHILD_MARKER: "5"}, None),
    ],
)
def test_only_processes_other_than_0_of_an_explicit_run_are_supervised(environ, expected):
    assert supervise.supervised_process(environ) == expected


def test_the_child_exit_code_and_both_stderr_streams_come_through(tmp_path):
    proc = _start(tmp_path, "3")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "native line" in err and "python line" in err


def test_process_0_is_not_supervised(tmp_path):
    proc = _start(tmp_path, "abort", process_id="0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGABRT and "Check failure" in err


def test_jax_abort_on_a_lost_coordinator_becomes_one_line_and_exit_69(tmp_path):
    proc = _start(tmp_path, "abort")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PEER_LOST, err
    assert "Check failure" not in err and "Terminating process" not in err and "F1202" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [line for line in err.splitlines() if "error" in line.lower()], err
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of this 2-process run was lost: ")
    assert "process 1 stops too" in errors[0] and "native line" in err


def test_any_other_abort_is_relayed_unchanged_with_its_signal(tmp_path):
    proc = _start(tmp_path, "other-abort")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGABRT
    assert "F0000 something.cc:1] Check failed: x" in err and "error:" not in err


def test_sigterm_to_the_supervisor_reaches_the_child_once(tmp_path):
    proc = _start(tmp_path, "wait")
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and err.count("TERM in child") == 1, err
    assert time.monotonic() - started < 10


def test_a_signal_to_every_process_of_the_job_is_one_request_not_two(tmp_path):
    """A scheduler that signals every process (SLURM, a cgroup) reaches the child directly and through its
    supervisor: the forwarded copy must not count as the second signal that stops at once without saving."""
    proc = _start(tmp_path, "preempt")
    child_pid = int(proc.stdout.readline().split()[1])
    assert child_pid != proc.pid
    os.kill(child_pid, signal.SIGTERM)
    time.sleep(0.2)  # handled before the copy comes (two at once could merge into one pending signal)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "saved" in err and "stopping at once" not in err, err
