"""A run's record after the fact: which checkpoint export / predict use, what a resume may change and how it is
recorded, local paths that hold from any directory, a checkpoint rotated away while it is read.

One tiny RTE run with ``train.select_best`` (best step before the last), started from its own directory with
relative model and data paths; every test works on a copy of its output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapad_jax.run import core as run_lib
from adapad_jax.run import saved_run
from adapad_jax.cli import errors as cli_errors
from adapad_jax.config.schema import ConfigError
from adapad_jax.runtime.failures import EXIT_BAD_INPUT, EXIT_PREEMPTED, CheckpointMoved
from adapad_jax.run.prediction import predict
from adapad_jax.testing.toy import enable_compilation_cache

from test_e2e_runs import read_jsonl, tiny_run_config

enable_compilation_cache()
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATE, NUM_STEPS = 1e-2, 12


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory) -> Path:
    """The run's output directory; it was started in its parent with model.name_or_path='ckpt' (relative)."""
    tmp = tmp_path_factory.mktemp("rte")
    config = tiny_run_config(tmp, "glue_rte", "deberta")
    config.train.num_steps = NUM_STEPS
    config.train.select_best, config.train.eval_every_steps = True, 2
    config.optim.learning_rate = LEARNING_RATE
    config.adapter.alpha, config.adapter.orth_reg, config.optim.adapter_weight_decay = 24.0, 0.3, 0.01  # glue_rte's
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        config.model.name_or_path = "ckpt"
        config.data.train_file = os.path.relpath(config.data.train_file, tmp)
        config.data.validation_file = os.path.relpath(config.data.validation_file, tmp)
        config.output_dir = "run"
        run_lib.run(config, progress=False, log=lambda _: None)
    finally:
        os.chdir(cwd)
    return tmp / "run"


def _copy(run_dir: Path, tmp_path: Path) -> tuple[Path, object]:
    """A copy of the run and its config (loaded back, output_dir pointing at the copy)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = saved_run.load_run_config(copy)
    config.output_dir = str(copy)
    return copy, config


def test_predict_and_export_default_to_the_step_the_run_exported(rte_run, tmp_path, monkeypatch):
    results = json.loads((rte_run / "eval_results.json").read_text())
    best, last = results["best_step"], results["last_step"]
    assert best != last and last == NUM_STEPS, "the fixture run should find its best before its last step"
    steps = sorted(int(p.name) for p in (rte_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == last and best in steps
    monkeypatch.chdir(tmp_path)  # another directory than the run was started from
    config = saved_run.load_run_config(rte_run)
    lines: list[str] = []
    out = predict(rte_run, config.data.validation_file, out_dir=str(tmp_path / "predicted"), log=lines.append)
    assert lines[0].startswith(f"using checkpoint step {best} of {rte_run}: the run's best checkpoint"), lines[0]
    assert f"the last step, {last}" in lines[0] and "--step" in lines[0]
    predicted = json.loads((out / "metrics.json").read_text())
    assert predicted["step"] == best
    assert predicted["metrics"]["accuracy"] == pytest.approx(results["best_metrics"]["accuracy"])

    lines.clear()
    exported = saved_run.export_checkpoint(rte_run, out_dir=str(tmp_path / "exported"), log=lines.append)
    assert lines[0].startswith(f"using checkpoint step {best} of {rte_run}"), lines[0]
    assert json.loads((exported / "ranks.json").read_text()) == json.loads((rte_run / "ranks.json").read_text())
    from safetensors.numpy import load_file

    mine = load_file(exported / "adapter" / "adapter_model.safetensors")
    runs = load_file(rte_run / "adapter" / "adapter_model.safetensors")
    assert mine.keys() == runs.keys()
    for key in mine:
        np.testing.assert_array_equal(mine[key], runs[key], err_msg=key)

    lines.clear()
    saved_run.export_checkpoint(rte_run, step=last, out_dir=str(tmp_path / "last"), log=lines.append)
    assert lines[0] == f"using checkpoint step {last} of {rte_run}: --step {last}"


def test_before_the_run_exports_the_default_is_its_best_evaluated_checkpoint_so_far(rte_run, tmp_path):
    copy, config = _copy(rte_run, tmp_path)
    best = json.loads((copy / "eval_results.json").read_text())["best_step"]
    (copy / "eval_results.json").unlink()  # as while the run still trains
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    assert saved_run.default_step(copy, config, steps) == (
        best, "the best evaluated checkpoint so far (the run has not exported an adapter yet)")
    config.train.select_best = False
    assert saved_run.default_step(copy, config, steps) == (
        steps[-1], "the newest checkpoint (the run has not exported an adapter yet)")


def test_local_paths_are_stored_absolute(rte_run):
    ckpt = str(rte_run.parent / "ckpt")
    saved = json.loads((rte_run / "config.json").read_text())
    assert saved["model"]["name_or_path"] == ckpt
    assert saved["data"]["train_file"] == str(rte_run.parent / "data" / Path(saved["data"]["train_file"]).name)
    assert os.path.isabs(saved["data"]["validation_file"])
    adapter = json.loads((rte_run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == ckpt
    assert ckpt in (rte_run / "adapter" / "README.md").read_text()


def test_a_local_base_model_that_is_gone_has_its_own_line(rte_run, tmp_path):
    copy, _ = _copy(rte_run, tmp_path)
    saved = json.loads((copy / "config.json").read_text())
    saved["model"]["name_or_path"] = str(tmp_path / "moved_away" / "ckpt")  # as if the model directory moved
    (copy / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as gone:
        saved_run.export_checkpoint(copy, out_dir=str(tmp_path / "out"), log=lambda _: None)
    assert "no longer exists" in str(gone.value) and str(tmp_path / "moved_away" / "ckpt") in str(gone.value)
    assert "Hugging Face" not in str(gone.value)


def test_a_resume_that_changes_the_trajectory_is_refused_and_config_json_kept(rte_run, tmp_path):
    copy, config = _copy(rte_run, tmp_path)
    before = (copy / "config.json").read_bytes()
    config.optim.learning_rate = 1e-3
    with pytest.raises(ConfigError, match=r"optim.learning_rate=0.01; this config has optim.learning_rate=0.001"):
        run_lib.run(config, progress=False, log=lambda _: None)
    assert (copy / "config.json").read_bytes() == before
    assert not (copy / run_lib.RESUMES_FILE).exists()


def test_allowed_changes_on_resume_are_recorded_not_merged(rte_run, tmp_path):
    copy, config = _copy(rte_run, tmp_path)
    before = (copy / "config.json").read_bytes()
    old_log_every = int(config.train.log_every_steps)
    config.train.log_every_steps = old_log_every + 4
    lines: list[str] = []
    run_lib.run(config, progress=False, log=lines.append)
    resumed = [line for line in lines if line.startswith("resuming")]
    assert resumed == [f"resuming {copy} from step {NUM_STEPS} with train.log_every_steps {old_log_every} -> "
                       f"{old_log_every + 4} (recorded in resumes.jsonl; config.json keeps the run's first config)"]
    assert (copy / "config.json").read_bytes() == before
    records = read_jsonl(copy / run_lib.RESUMES_FILE)
    assert len(records) == 1 and records[0]["from_step"] == NUM_STEPS
    assert records[0]["changes"] == {"train.log_every_steps": [old_log_every, old_log_every + 4]}
    assert saved_run.load_run_config(copy).train.log_every_steps == old_log_every + 4


def test_a_new_length_needs_extend_schedule_and_says_how_the_rate_moves(rte_run, tmp_path):
    copy, config = _copy(rte_run, tmp_path)
    config.train.num_steps = NUM_STEPS + 4
    with pytest.raises(ConfigError, match=r"train.num_steps=12; this config has train.num_steps=16.*extend_schedule"):
        run_lib.run(config, progress=False, log=lambda _: None)
    assert not (copy / run_lib.RESUMES_FILE).exists()

    config.train.extend_schedule = True
    lines: list[str] = []
    run_lib.run(config, progress=False, log=lines.append)
    # Linear warmup over 1 step, then linear decay to 0 at the last: the rate of step s (count s - 1) of an
    # n-step plan is lr * (1 - (s - 2) / (n - 1)); step 13 of the 12-step plan is past its end (0).
    new_rate = LEARNING_RATE * (1 - (13 - 2) / (16 - 1))
    replanned = [line for line in lines if line.startswith("learning-rate schedule")]
    assert replanned == [f"learning-rate schedule re-planned for 16 steps (it was planned for 12; "
                         f"train.extend_schedule=True): the rate of step 13 goes from {0.0:.2e} to {new_rate:.2e}"]
    logged = {r["step"]: r["lr"] for r in read_jsonl(copy / "metrics.jsonl") if "lr" in r}
    assert logged[13] == pytest.approx(new_rate, rel=1e-6)
    assert logged[16] == pytest.approx(LEARNING_RATE * (1 - 14 / 15), rel=1e-6)
    (record,) = read_jsonl(copy / run_lib.RESUMES_FILE)
    assert record["changes"]["train.num_steps"] == [NUM_STEPS, NUM_STEPS + 4]
    assert record["schedule"]["planned_steps"] == NUM_STEPS and record["schedule"]["num_steps"] == NUM_STEPS + 4
    assert record["schedule"]["rate_after"] == pytest.approx(new_rate, rel=1e-6)
    assert json.loads((copy / "config.json").read_text())["train"]["num_steps"] == NUM_STEPS
    assert json.loads((copy / "eval_results.json").read_text())["last_step"] == NUM_STEPS + 4


def test_a_checkpoint_rotated_away_while_it_is_read_says_so_and_to_retry(rte_run, tmp_path, monkeypatch, capsys):
    from adapad_jax.training.checkpointing import Checkpointer

    copy, _ = _copy(rte_run, tmp_path)
    read_meta = Checkpointer.restore_meta

    def rotated_while_reading(self, step):
        shutil.rmtree(Path(self.directory) / str(step))  # what the running training's rotation does
        return read_meta(self, step)

    monkeypatch.setattr(Checkpointer, "restore_meta", rotated_while_reading)
    with pytest.raises(SystemExit) as caught, cli_errors.user_errors():
        saved_run.export_checkpoint(copy, out_dir=str(tmp_path / "out"), log=lambda _: None)
    assert caught.value.code == EXIT_PREEMPTED != EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()
    assert "was removed while it was being read" in line and "run the command again" in line
    assert issubclass(CheckpointMoved, cli_errors.RunFailure)


def test_a_batch_size_change_on_resume_is_one_line_before_any_compute(rte_run, tmp_path):
    copy, _ = _copy(rte_run, tmp_path)
    before = (copy / "config.json").read_bytes()
    (tmp_path / "cfg.py").write_text(
        "from adapad_jax.run.saved_run import load_run_config\n\ndef get_config():\n"
        f"    return load_run_config({str(copy)!r})\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(tmp_path / "cfg.py"),
         f"--config.output_dir={copy}", "--config.train.batch_size=4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_BAD_INPUT and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "train.batch_size=8; this config has train.batch_size=4" in lines[0]
    assert "tokenise" not in result.stdout and "resuming" not in result.stdout
    assert (copy / "config.json").read_bytes() == before
