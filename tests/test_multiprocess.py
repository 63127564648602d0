"""Multi-process wiring: per-process batch blocks, the jax.distributed environment, and a real 2-process run.

The 2-process test starts two `launch/train.py` processes on localhost (jax.distributed with the CPU backend,
two simulated devices each, coordinator on 127.0.0.1) and compares their outputs with a single-process run of
the same config on a mesh of the same shape.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from adapad_jax.run import core as run_lib
from adapad_jax.runtime import distributed
from adapad_jax.config.schema import ConfigError, base_config
from adapad_jax.data.batching import TrainBatches, eval_batches
from adapad_jax.testing import tiny
from adapad_jax.training.sharding import batch_slice_for_process

REPO = Path(__file__).resolve().parents[1]


def _features(num_rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 100, size=(num_rows, 5)).astype(np.int32),
        "attention_mask": np.ones((num_rows, 5), np.int32),
        "labels": np.arange(num_rows, dtype=np.int32),
    }


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_blocks_of_train_batches_concatenate_to_the_global_batch(process_count):
    features, batch_size = _features(37), 8
    single = TrainBatches(features, batch_size, seed=3)
    parts = [TrainBatches(features, batch_size, seed=3, process_index=p, process_count=process_count)
             for p in range(process_count)]
    for step in range(12):  # crosses an epoch boundary (4 steps per epoch)
        whole = next(single)
        pieces = [next(part) for part in parts]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([piece[key] for piece in pieces]), whole[key], err_msg=key)
        if step == 5:  # resume each process's iterator from its saved position
            states = [part.state_dict() for part in parts]
            parts = [TrainBatches(features, batch_size, seed=3, process_index=p, process_count=process_count)
                     for p in range(process_count)]
            for part, state in zip(parts, states):
                part.load_state_dict(state)


def test_process_blocks_of_eval_batches_concatenate_to_the_global_batch():
    features = _features(13)
    single = list(eval_batches(features, 8))
    parts = [list(eval_batches(features, 8, process_index=p, process_count=2)) for p in range(2)]
    assert len(single) == len(parts[0]) == len(parts[1]) == 2
    for index, whole in enumerate(single):
        for key in whole:
            joined = np.concatenate([parts[0][index][key], parts[1][index][key]])
            np.testing.assert_array_equal(joined, whole[key], err_msg=key)
    assert single[-1]["example_weight"].sum() == 13 - 8


@pytest.mark.parametrize(
    "grid, expected",
    [
        ([[0, 0, 0, 0], [1, 1, 1, 1]], [(0, 2), (1, 2)]),  # data=2 x components=4, one data row per process
        ([[0, 0], [0, 0], [1, 1], [1, 1]], [(0, 2), (1, 2)]),  # two data rows per process
        ([[0, 0, 1, 1]], [(0, 1), (0, 1)]),  # components span the processes: both feed the whole batch
        ([[0, 1], [2, 3]], [(0, 2), (0, 2), (1, 2), (1, 2)]),  # processes 0, 1 share data row 0
        ([[0], [1], [2], [3]], [(0, 4), (1, 4), (2, 4), (3, 4)]),
    ],
)
def test_batch_slice_for_process_on_hand_made_meshes(grid, expected):
    grid = np.array(grid)
    assert [batch_slice_for_process(grid, p) for p in range(len(expected))] == expected


@pytest.mark.parametrize(
    "grid, process, message",
    [
        ([[0], [1], [0]], 0, "non-contiguous"),
        ([[0], [0], [1]], 1, "unevenly"),
        ([[0, 0], [0, 0]], 1, "no device in the mesh"),
    ],
)
def test_batch_slice_for_process_refuses_meshes_it_cannot_feed(grid, process, message):
    with pytest.raises(ValueError, match=message):
        batch_slice_for_process(np.array(grid), process)


def test_single_process_mesh_feeds_the_whole_batch():
    from adapad_jax.training import make_mesh
    from adapad_jax.training.sharding import process_batch_slice

    assert process_batch_slice(make_mesh(2, 4)) == (0, 1)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
         {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
        ({"ADAPAD_DISTRIBUTED": "auto"}, {}),
        ({"ADAPAD_DISTRIBUTED": "AUTO", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "0"}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}),
    ],
)
def test_distributed_settings_from_the_environment(environ, expected):
    assert distributed.distributed_settings(environ) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"not in \[0, "),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "integers"),
        ({"ADAPAD_DISTRIBUTED": "yes"}, "ADAPAD_DISTRIBUTED"),
    ],
)
def test_distributed_settings_refuse_incomplete_or_bad_values(environ, message):
    with pytest.raises(ConfigError, match=message):
        distributed.distributed_settings(environ)


@pytest.mark.parametrize("value, expected", [(None, 60.0), ("", 60.0), ("4", 4.0), (" 0.5 ", 0.5)])
def test_peer_timeout_from_the_environment(value, expected):
    environ = {} if value is None else {"ADAPAD_PEER_TIMEOUT": value}
    assert distributed.peer_timeout(environ) == expected


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_peer_timeout_refuses_what_is_not_a_positive_number(value):
    with pytest.raises(ConfigError, match=f"ADAPAD_PEER_TIMEOUT='{value}' must be a positive number of seconds"):
        distributed.peer_timeout({"ADAPAD_PEER_TIMEOUT": value})


def test_the_peer_watch_names_the_process_whose_heartbeat_stopped_and_skips_finished_ones():
    watch = distributed.PeerWatch(client=None, process=0, count=3, timeout=5.0)
    key = "adapad/heartbeat/"
    assert watch.silent_peer({f"{key}0": "7", f"{key}1": "1", f"{key}2": "1"}, now=100.0) is None
    assert watch.silent_peer({f"{key}0": "8", f"{key}1": "2", f"{key}2": "done"}, now=104.0) is None
    assert watch.silent_peer({f"{key}0": "9", f"{key}1": "2", f"{key}2": "done"}, now=108.0) is None  # 4 s
    assert watch.silent_peer({f"{key}0": "9", f"{key}1": "2", f"{key}2": "done"}, now=109.5) == 1  # 5.5 s
    late = distributed.PeerWatch(client=None, process=1, count=2, timeout=5.0)
    assert late.silent_peer({}, now=0.0) is None and late.silent_peer({}, now=6.0) == 0  # never heard at all


def test_initialize_distributed_is_a_no_op_without_the_environment():
    assert distributed.initialize_distributed({}) is False


class _RecordingTrainer:
    """Stands in for the Trainer in ``predict_split``: records the process block it is fed."""

    def __init__(self, batch_slice):
        self.batch_slice = batch_slice
        self.fed: list[dict[str, np.ndarray]] = []

    def predict(self, batch):
        self.fed.append(batch)
        return {"logits": np.zeros((len(batch["input_ids"]) * self.batch_slice[1], 2))}


def test_predict_split_feeds_the_trainer_its_process_block():
    class EvalSet:
        features, num_features = _features(10), 10

    trainer = _RecordingTrainer((1, 2))
    outputs = run_lib.predict_split(trainer, EvalSet(), 4)
    expected = list(eval_batches(EvalSet.features, 4, process_index=1, process_count=2))
    assert len(trainer.fed) == len(expected) == 3
    for fed, want in zip(trainer.fed, expected):
        np.testing.assert_array_equal(fed["input_ids"], want["input_ids"])
    assert outputs["logits"].shape == (10, 2)


# ------------------------------------------------------------------------------------------ two real processes

CONFIG_FILE = textwrap.dedent(
    """
    import json
    from adapad_jax.config.schema import base_config

    def get_config():
        config = base_config()
        for dotted, value in json.loads({fields!r}).items():
            *sections, leaf = dotted.split(".")
            node = config
            for section in sections:
                node = node[section]
            node[leaf] = tuple(value) if isinstance(value, list) else value
        return config
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_fields(tmp: Path, files, output_dir: Path) -> dict:
    return {
        "task": "glue_sst2", "output_dir": str(output_dir), "model.name_or_path": str(tmp / "ckpt"),
        "data.train_file": str(files.train_file), "data.validation_file": str(files.validation_file),
        "data.max_length": 32, "adapter.r_max": 2, "adapter.rank_budget": 30, "adapter.top_k": 2,
        "adapter.growth_interval": 2, "adapter.init_std": 0.3, "optim.learning_rate": 1e-2, "optim.warmup_steps": 1,
        "train.num_steps": 4, "train.batch_size": 8, "train.eval_batch_size": 8, "train.log_every_steps": 1,
        "checkpoint.every_steps": 2, "mesh.data": 2, "mesh.components": 2,
    }


def _predictions(output_dir: Path) -> dict[int, np.ndarray]:
    rows = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    return {row["idx"]: np.asarray(row["logits"]) for row in rows}


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process(tmp_path):
    tiny.build_tiny_deberta(tmp_path / "ckpt", task="classification", seed=1)
    files = tiny.write_tiny_glue(tmp_path / "data", "glue_sst2", n_train=32, n_val=12)

    single_config = base_config()
    for dotted, value in _run_fields(tmp_path, files, tmp_path / "single").items():
        *sections, leaf = dotted.split(".")
        (single_config[sections[0]] if sections else single_config)[leaf] = value
    single = run_lib.run(single_config, progress=False, log=lambda _: None)

    multi_dir = tmp_path / "multi"
    config_path = tmp_path / "two_process_config.py"
    config_path.write_text(CONFIG_FILE.format(fields=json.dumps(_run_fields(tmp_path, files, multi_dir))))
    port = _free_port()
    procs = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config_path)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert "total rank" in outputs[0] and "total rank" not in outputs[1]  # only process 0 logs

    assert json.loads((multi_dir / "ranks.json").read_text()) == single.ranks
    multi_predictions, single_predictions = _predictions(multi_dir), _predictions(tmp_path / "single")
    assert sorted(multi_predictions) == sorted(single_predictions) and len(single_predictions) == 12
    for idx, logits in single_predictions.items():
        np.testing.assert_allclose(multi_predictions[idx], logits, atol=2e-4, err_msg=f"idx {idx}")
    # every record written once: only process 0 appends to metrics.jsonl
    records = [json.loads(line) for line in (multi_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    single_losses = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").read_text()
                     .splitlines() if "loss" in json.loads(line)]
    np.testing.assert_allclose([r["loss"] for r in records if "loss" in r], single_losses, rtol=1e-4, atol=1e-5)
    assert sorted(int(p.name) for p in (multi_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def _start_two(config_path: Path, port: int, extra_env: dict) -> list[subprocess.Popen]:
    procs = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id),
                   **extra_env)
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config_path)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def _checkpoint_steps(output_dir: Path) -> list[int]:
    directory = output_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _assert_the_rerun_resumes(fields: dict, out: Path) -> None:
    """Rerun in this process on the same mesh (quicker than two more processes): it resumes from the newest
    checkpoint and trains two more steps (a shorter run than the killed one: extend_schedule re-plans it)."""
    resume_from = _checkpoint_steps(out)[-1]
    config = base_config()
    for dotted, value in {**fields, "train.num_steps": resume_from + 2, "train.extend_schedule": True}.items():
        *sections, leaf = dotted.split(".")
        (config[sections[0]] if sections else config)[leaf] = value
    lines = []
    result = run_lib.run(config, progress=False, log=lines.append)
    assert any(line.startswith(f"resuming {out} from step {resume_from} ") for line in lines), lines
    assert result.step == resume_from + 2


def _kill_one_mid_run(tmp_path, killed: int, peer_timeout: str) -> tuple[int, str, float, dict, Path]:
    """Two processes train until a checkpoint exists; then process ``killed`` gets kill -9. Returns the survivor's
    exit code, its stderr, the seconds it took to stop, and the run's fields and output_dir."""
    import signal
    import time

    tiny.build_tiny_deberta(tmp_path / "ckpt", task="classification", seed=1)
    files = tiny.write_tiny_glue(tmp_path / "data", "glue_sst2", n_train=32, n_val=12)
    out = tmp_path / "multi"
    fields = {**_run_fields(tmp_path, files, out), "train.num_steps": 100000, "train.log_every_steps": 50}
    config_path = tmp_path / "config.py"
    config_path.write_text(CONFIG_FILE.format(fields=json.dumps(fields)))
    procs = _start_two(config_path, _free_port(), {"ADAPAD_PEER_TIMEOUT": peer_timeout})
    survivor = procs[1 - killed]
    try:
        deadline = time.monotonic() + 240
        while not _checkpoint_steps(out) and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
        assert _checkpoint_steps(out), procs[0].stderr.read()[-3000:] if procs[0].poll() is not None else ""
        procs[killed].send_signal(signal.SIGKILL)
        started = time.monotonic()
        _, err = survivor.communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return survivor.returncode, err, waited, fields, out


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_one_line_and_the_rerun_resumes(tmp_path):
    """kill -9 of process 1 mid-run: process 0 stops within ADAPAD_PEER_TIMEOUT with one line naming process 1 and
    exit 69 (not JAX's C++ abort after its 100 s heartbeat), and the newest checkpoint is where a rerun resumes
    (rerun in this process on the same mesh, which is quicker than two more processes)."""
    from adapad_jax.runtime.failures import EXIT_PEER_LOST

    returncode, err, waited, fields, out = _kill_one_mid_run(tmp_path, killed=1, peer_timeout="4")
    assert returncode == EXIT_PEER_LOST, err[-3000:]
    assert waited < 4 + 10, waited
    assert "Traceback" not in err and "Check failed" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "process 1 of this 2-process run was lost" in errors[0], err[-3000:]

    _assert_the_rerun_resumes(fields, out)


@pytest.mark.slow
def test_a_killed_coordinator_stops_the_other_with_one_line_and_the_rerun_resumes(tmp_path):
    """kill -9 of process 0 (the coordinator, hosting JAX's coordination service) mid-run: process 1 stops at once
    with one line naming process 0 and exit 69 instead of JAX's C++ abort (exit 134 and a stack trace), and the
    newest checkpoint is where a rerun resumes."""
    from adapad_jax.runtime.failures import EXIT_PEER_LOST

    returncode, err, waited, fields, out = _kill_one_mid_run(tmp_path, killed=0, peer_timeout="30")
    assert returncode == EXIT_PEER_LOST, err[-3000:]
    assert waited < 10, waited  # not the 30 s peer timeout: the coordinator's loss is seen at once
    for trace in ("Check failure", "*** ", "Terminating process", "Traceback"):
        assert trace not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "process 0 of this 2-process run was lost" in errors[0], err[-3000:]
    assert "process 1 stops too" in errors[0]

    _assert_the_rerun_resumes(fields, out)
