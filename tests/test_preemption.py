"""SIGTERM/SIGINT during training: the current step finishes, a checkpoint is written at that step, the process
exits 75 with one line, and the rerun ends bit-exactly where an uninterrupted run does. A second signal exits
at once without saving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from adapad_jax.runtime.failures import EXIT_PREEMPTED
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config

enable_compilation_cache()

ROOT = Path(__file__).resolve().parents[1]
TOTAL, SLOW_AFTER = 10, 5
OVERRIDES = {"adapter.r_max": 4, "adapter.rank_budget": 10, "adapter.top_k": 1, "adapter.growth_interval": 2,
             "adapter.init_std": 0.1, "checkpoint.every_steps": 4, "checkpoint.keep": 2, "adapter.dropout": 0.1,
             "train.log_every_steps": 4}

RUNNER = textwrap.dedent(
    """
    import sys, time
    from adapad_jax.cli.errors import user_errors
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config
    enable_compilation_cache()
    out, total, slow_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class SlowBatches(ToyBatches):
        def __next__(self):
            if slow_after and self.position >= slow_after:
                print("SLOW", self.position, flush=True)
                time.sleep(1.5)
            return super().__next__()

    with user_errors():
        model = make_toy_model(hidden=16, adapter_dropout=0.1)
        teacher = planted_teacher(model, [2, 1, 0, 0])
        trainer = Trainer(model, toy_config(**{overrides!r}), make_mesh(1, 1), out)
        data_state = trainer.restore_or_init({{"position": 0}})
        data = SlowBatches(model, teacher, 8, start=data_state["position"])
        try:
            trainer.train(data, total, data.state, progress=False)
        finally:
            trainer.close()
    print("DONE", trainer.step, flush=True)
    """
).format(overrides=OVERRIDES)


def _start(tmp_path, out, slow_after):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(script), str(out), str(TOTAL), str(slow_after)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_slow_batch(proc) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("SLOW") or not line:
            assert line, proc.communicate()[1][-3000:]
            return
    raise AssertionError("the runner never reached its slow batches")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_resumes_bit_exactly(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, out, SLOW_AFTER)
    _wait_for_slow_batch(proc)  # fetching batch 5 (for step 6): step 6 is under way
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: SIGTERM: stopped after step 6 and saved a checkpoint at step 6 in {out}/checkpoints; "
                      "rerun the same command to resume"]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 6]

    rerun = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(out), str(TOTAL), "0"],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"DONE {TOTAL}" in rerun.stdout, rerun.stderr[-3000:]

    model = make_toy_model(hidden=16, adapter_dropout=0.1)
    straight = Trainer(model, toy_config(**OVERRIDES), make_mesh(1, 1), tmp_path / "straight")
    straight.restore_or_init({"position": 0})
    data = ToyBatches(model, planted_teacher(model, [2, 1, 0, 0]), 8)
    straight.train(data, TOTAL, data.state, progress=False)
    resumed = Trainer(model, toy_config(**OVERRIDES), make_mesh(1, 1), out)
    assert resumed.restore_or_init({"position": -1}) == {"position": TOTAL}
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(straight.state))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(resumed.state))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    lines = [(d / "metrics.jsonl").read_text().count("\n") for d in (out, tmp_path / "straight")]
    assert lines[0] == lines[1], "metrics of steps past the stop checkpoint are not duplicated"
    straight.close()
    resumed.close()


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_saving(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, out, SLOW_AFTER)
    _wait_for_slow_batch(proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: SIGINT again: stopping at once without saving"]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [4]


LINGERING_TRAIN = textwrap.dedent(
    """
    import atexit, sys, time

    def linger():  # registered first, so it runs last: the interpreter is shutting down, the outputs are written
        print("EXITING", flush=True)
        time.sleep(120)

    atexit.register(linger)
    from adapad_jax.cli.train import main
    main()
    """
)


@pytest.mark.slow
def test_a_signal_after_the_run_finished_exits_0_quietly(tmp_path):
    """SIGTERM during interpreter shutdown, after the outputs are complete: exit 0 at once, nothing printed (not
    "nothing new was saved, rerun to resume" with an atexit traceback)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_e2e_runs import tiny_run_config

    config = tiny_run_config(tmp_path, "glue_rte", "deberta")
    config.train.num_steps = 0  # evaluate and export: the outputs are complete when the command returns
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text(config.to_json())
    (tmp_path / "cfg.py").write_text(
        "from adapad_jax.run.saved_run import load_run_config\n\ndef get_config():\n"
        f"    return load_run_config({str(tmp_path / 'saved')!r})\n")
    (tmp_path / "launch.py").write_text(LINGERING_TRAIN)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "launch.py"), "--config", str(tmp_path / "cfg.py")],
                            env={**os.environ, "PYTHONPATH": str(ROOT), "ADAPAD_MALLOC": "system"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "EXITING":
                break
        else:
            raise AssertionError(proc.communicate()[1][-3000:])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "nothing new was saved" not in err and "error:" not in err, err[-3000:]
    assert (Path(config.output_dir) / "eval_results.json").is_file()
