"""Exact resume from orbax checkpoints, including a run killed with SIGKILL, and a leftover tmp dir."""

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

from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import ToyBatches, make_toy_model, planted_teacher, toy_config
from adapad_jax.testing.toy import enable_compilation_cache

enable_compilation_cache()

ROOT = Path(__file__).resolve().parents[1]
N = 4
OVERRIDES = {"adapter.r_max": 4, "adapter.rank_budget": 10, "adapter.top_k": 1, "adapter.growth_interval": 2,
             "adapter.init_std": 0.1, "checkpoint.every_steps": N, "checkpoint.keep": 2, "adapter.dropout": 0.1}

RUNNER = textwrap.dedent(
    """
    import sys, time
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config
    enable_compilation_cache()
    out, total, slow_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    overrides = {overrides!r}

    class SlowBatches(ToyBatches):
        def __next__(self):
            if slow_after and self.position >= slow_after:
                time.sleep(2.0)
            return super().__next__()

    model = make_toy_model(hidden=16, adapter_dropout=0.1)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    trainer = Trainer(model, toy_config(**overrides), make_mesh(1, 1), out)
    data_state = trainer.restore_or_init({{"position": 0}})
    data = SlowBatches(model, teacher, 8, start=data_state["position"])
    trainer.train(data, total, data.state, progress=False)
    trainer.close()
    print("DONE", trainer.step)
    """
).format(overrides=OVERRIDES)


def _straight_run(out):
    model = make_toy_model(hidden=16, adapter_dropout=0.1)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    trainer = Trainer(model, toy_config(**OVERRIDES), make_mesh(1, 1), out)
    trainer.restore_or_init({"position": 0})
    data = ToyBatches(model, teacher, 8)
    trainer.train(data, 2 * N, data.state, progress=False)
    return trainer


def _assert_same_state(a, b, rtol: float = 0.0, atol: float = 0.0):
    """Same tree; leaves bit-equal, or within (rtol, atol) when given."""
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        if rtol or atol:
            np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(x, np.float64), rtol=rtol, atol=atol,
                                       err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _run_that_died_after_step_n(model, teacher, out):
    """A run with the straight run's schedule (2N steps) whose step-2N checkpoint never made it to disk."""
    import shutil

    first = Trainer(model, toy_config(**OVERRIDES), make_mesh(1, 1), out)
    first.restore_or_init({"position": 0})
    data = ToyBatches(model, teacher, 8)
    first.train(data, 2 * N, data.state, progress=False)
    first.close()
    shutil.rmtree(out / "checkpoints" / str(2 * N))


@pytest.mark.slow
def test_killed_run_resumes_bit_exactly(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed_dir), str(2 * N), str(N + 1)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = killed_dir / "checkpoints" / str(N)
    deadline = time.time() + 240
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_dir(), proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "checkpoints" / str(2 * N)).exists()

    rerun = subprocess.run([sys.executable, str(script), str(killed_dir), str(2 * N), "0"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"DONE {2 * N}" in rerun.stdout

    straight = _straight_run(tmp_path / "straight")
    model = straight.model
    resumed = Trainer(model, toy_config(**OVERRIDES), make_mesh(1, 1), killed_dir)
    assert resumed.restore_or_init({"position": -1}) == {"position": 2 * N}
    assert resumed.step == 2 * N
    assert int(straight.state["alloc"]["rank"].sum()) > 4, "the run should include growth events"
    _assert_same_state(straight.state, resumed.state)
    for (k1, (a1, b1)), (k2, (a2, b2)) in zip(straight.committed_peft_factors().items(),
                                              resumed.committed_peft_factors().items()):
        assert k1 == k2
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
    steps = [line for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * N, "metrics of steps past the checkpoint are dropped on resume"
    straight.close()
    resumed.close()


def test_in_process_resume_and_leftover_tmp_dir(tmp_path):
    straight = _straight_run(tmp_path / "straight")
    model, teacher = straight.model, planted_teacher(straight.model, [2, 1, 0, 0])
    out = tmp_path / "resumed"
    _run_that_died_after_step_n(model, teacher, out)
    # and that it died while writing a later checkpoint
    tmp = out / "checkpoints" / f"{3 * N}.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00partial")

    second = Trainer(model, toy_config(**OVERRIDES), make_mesh(1, 1), out)
    with pytest.raises(ValueError, match=f"no checkpoint for step {2 * N}"):
        second.restore_or_init({"position": 0}, step=2 * N)
    data_state = second.restore_or_init({"position": 0})
    assert data_state == {"position": N} and second.step == N
    data = ToyBatches(model, teacher, 8, start=data_state["position"])
    second.train(data, 2 * N, data.state, progress=False)
    _assert_same_state(straight.state, second.state)
    straight.close()
    second.close()


def test_checkpoint_from_another_method_is_refused(tmp_path):
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    first = Trainer(model, toy_config(**{"checkpoint.every_steps": 1}), make_mesh(1, 1), tmp_path)
    first.restore_or_init({"position": 0})
    data = ToyBatches(model, teacher, 8)
    first.train(data, 1, data.state, progress=False)
    first.close()
    other = Trainer(model, toy_config(**{"adapter.method": "lora"}), make_mesh(1, 1), tmp_path)
    with pytest.raises(ValueError, match="written by a different run"):
        other.restore_or_init({"position": 0})


def test_resume_on_a_different_mesh(tmp_path):
    """Checkpoints written on one device resume on a (data=2, components=2) mesh; with dropout on, the result
    matches the straight one-device run (to float tolerance: the psum over devices reorders the sums)."""
    straight = _straight_run(tmp_path / "straight")
    model, teacher = straight.model, planted_teacher(straight.model, [2, 1, 0, 0])
    out = tmp_path / "moved"
    _run_that_died_after_step_n(model, teacher, out)
    second = Trainer(model, toy_config(**OVERRIDES), make_mesh(2, 2), out)
    data_state = second.restore_or_init({"position": 0})
    assert data_state == {"position": N} and second.step == N
    slot_a = second.state["trainable"]["slots"]["a"][0]
    assert slot_a.sharding.is_fully_replicated and len(slot_a.sharding.device_set) == 4
    data = ToyBatches(model, teacher, 8, start=data_state["position"])
    second.train(data, 2 * N, data.state, progress=False)
    _assert_same_state(straight.state, second.state, rtol=1e-5, atol=1e-6)
    straight.close()
    second.close()
