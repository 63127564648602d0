"""Runs that survive what goes wrong while they train: divergence, damaged checkpoints, a second run on the same
output_dir, unwritable outputs, a resume on another backbone or budget. (Signals: test_preemption.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.run import core as run_lib
from adapad_jax.outputs import output_set
from adapad_jax.cli import errors as cli_errors
from adapad_jax.config.schema import ConfigError, base_config
from adapad_jax.config.validation import check_fields
from adapad_jax.run.checks import check_resume
from adapad_jax.runtime.failures import EXIT_BAD_INPUT, Diverged, OutputWriteError
from adapad_jax.outputs.output_set import dumps_strict, publish_set
from adapad_jax.run.resume_identity import backbone_fingerprint, check_backbone, write_backbone_fingerprint
from adapad_jax.run.lock import OutputDirInUse, RunLock
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.recovery import ResumeMismatch
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config

enable_compilation_cache()

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {"adapter.r_max": 4, "adapter.rank_budget": 10, "adapter.top_k": 1, "adapter.growth_interval": 2,
             "adapter.init_std": 0.1, "checkpoint.every_steps": 2, "checkpoint.keep": 2}


class PoisonedBatches(ToyBatches):
    """Toy batches whose labels are NaN from position ``poison_at`` on."""

    def __init__(self, *args, poison_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.poison_at = poison_at

    def __next__(self):
        poisoned = self.position >= self.poison_at
        batch = super().__next__()
        if poisoned:
            batch["labels"] = np.full_like(batch["labels"], np.nan)
        return batch


def _trainer(out, model=None, **overrides):
    model = model or make_toy_model(hidden=16)
    trainer = Trainer(model, toy_config(**{**OVERRIDES, **overrides}), make_mesh(1, 1), out)
    return trainer


def _train(trainer, steps, batches_cls=ToyBatches, **kwargs):
    teacher = planted_teacher(trainer.model, [2, 1, 0, 0])
    data_state = trainer.restore_or_init({"position": 0})
    data = batches_cls(trainer.model, teacher, 8, start=data_state["position"], **kwargs)
    trainer.train(data, steps, data.state, progress=False)
    return trainer


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(jax.device_get(tree))
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


# ------------------------------------------------------------------------------------------------ divergence


def test_divergence_stops_with_the_step_and_saves_nothing_non_finite(tmp_path):
    # NaN labels from batch 5 on: the loss of step 6 is NaN; log every 3 steps, so it is seen at step 6, when
    # a checkpoint is also due; checkpoints keep 2, so without the guard NaN steps 6, 8 would rotate out 2 and 4.
    trainer = _trainer(tmp_path, **{"train.log_every_steps": 3})
    with pytest.raises(Diverged, match=r"the loss is not finite \(NaN or inf\) at step 6;.*checkpoint \(step 4\)"):
        _train(trainer, 10, PoisonedBatches, poison_at=5)
    assert trainer.checkpointer.all_steps() == [2, 4]
    trainer.close()
    again = _trainer(tmp_path)
    again.restore_or_init({"position": 0})
    assert again.step == 4 and _all_finite(again.state)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in metrics
    again.close()


def test_a_non_finite_state_is_never_saved_or_exported(tmp_path):
    trainer = _trainer(tmp_path)
    _train(trainer, 2)
    head = trainer.state["trainable"]["head"]
    trainer.state["trainable"]["head"] = jax.tree.map(lambda x: x * jnp.nan, head)
    with pytest.raises(Diverged, match="step 2 holds NaN or inf"):
        trainer.save({"position": 2})
    with pytest.raises(Diverged, match="export was not written"):
        run_lib.export_trainer(trainer, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    trainer.close()


@pytest.mark.parametrize("field, value, message", [
    ("optim.learning_rate", float("nan"), "optim.learning_rate=nan is not a finite number"),
    ("optim.learning_rate", float("inf"), "optim.learning_rate=inf is not a finite number"),
    ("optim.learning_rate", 0.0, "must be > 0"),
    ("optim.learning_rate", 1e4, "absurdly large"),
    ("optim.eps", float("nan"), "optim.eps=nan is not a finite number"),
    ("adapter.alpha", float("inf"), "adapter.alpha=inf is not a finite number"),
])
def test_non_finite_or_absurd_hyperparameters_are_refused(field, value, message):
    config = base_config()
    config.output_dir = "/tmp/unused"
    section, leaf = field.split(".")
    config[section][leaf] = value
    with pytest.raises(ConfigError, match=message):
        check_fields(config)


def test_strict_json_writes_null_for_non_finite_values(tmp_path):
    text = dumps_strict({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32("-inf"), "d": 2})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None, "d": 2}
    assert "NaN" not in text and "Infinity" not in text
    from adapad_jax.outputs.rank_outputs import MetricsWriter

    writer = MetricsWriter(tmp_path / "m.jsonl")
    writer.write({"step": 1, "loss": np.float32("nan")})
    assert json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=pytest.fail) == {"step": 1, "loss": None}
    output_set.write_json_atomic(tmp_path / "r.json", {"x": float("nan")})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail) == {"x": None}


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def _damage(step_dir: Path, kind: str) -> None:
    if kind == "truncated data file":
        data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
        for path in data:
            os.truncate(path, path.stat().st_size // 3)
    elif kind == "deleted state/_METADATA":
        (step_dir / "state" / "_METADATA").unlink()
    else:
        (step_dir / "meta" / "metadata").unlink()


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run to step 6 with checkpoints 4 and 6, and its final state."""
    out = tmp_path_factory.mktemp("six")
    trainer = _train(_trainer(out), 6)
    state = jax.device_get(trainer.state)
    trainer.close()
    return out, state


@pytest.mark.parametrize("kind", ["truncated data file", "deleted state/_METADATA", "deleted meta/metadata"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path, six_steps, kind, capfd):
    source, final_state = six_steps
    out = tmp_path / "run"
    shutil.copytree(source, out)
    _damage(out / "checkpoints" / "6", kind)
    trainer = _trainer(out)
    data_state = trainer.restore_or_init({"position": 0})
    assert data_state == {"position": 4} and trainer.step == 4
    assert (out / "checkpoints.damaged" / "6" / "meta").is_dir(), "moved aside, not deleted"
    assert not (out / "checkpoints" / "6").exists()
    warning = [line for line in capfd.readouterr().err.splitlines() if "cannot be read" in line]
    assert len(warning) == 1 and "checkpoint step 6" in warning[0] and "checkpoints.damaged/6" in warning[0]
    if kind == "truncated data file":  # continue: the same state as the undamaged run
        teacher = planted_teacher(trainer.model, [2, 1, 0, 0])
        data = ToyBatches(trainer.model, teacher, 8, start=4)
        trainer.train(data, 6, data.state, progress=False)
        for x, y in zip(jax.tree.leaves(final_state), jax.tree.leaves(jax.device_get(trainer.state))):
            np.testing.assert_array_equal(x, y)
    trainer.close()


def test_a_checkpoint_of_other_shapes_is_refused_not_moved_aside(tmp_path, six_steps):
    source, _ = six_steps
    out = tmp_path / "run"
    shutil.copytree(source, out)
    wider = _trainer(out, make_toy_model(hidden=24))
    with pytest.raises(ResumeMismatch, match="other shapes"):
        wider.restore_or_init({"position": 0})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6"]
    deeper = _trainer(out, make_toy_model(hidden=16, num_layers=3))
    with pytest.raises(ConfigError, match="written by a different run"):
        deeper.restore_or_init({"position": 0})


# ------------------------------------------------------------------------------------------------ budget on resume


def test_a_budget_below_the_total_rank_is_refused_and_a_larger_one_applies(tmp_path, six_steps):
    source, final_state = six_steps
    total = int(np.asarray(final_state["alloc"]["rank"]).sum())
    assert total > 4, "the run should have grown"
    shutil.copytree(source, tmp_path / "run")
    smaller = _trainer(tmp_path / "run", **{"adapter.rank_budget": total - 1})
    with pytest.raises(ResumeMismatch, match=f"rank_budget={total - 1} is below the total rank {total}"):
        smaller.restore_or_init({"position": 0})
    larger = _trainer(tmp_path / "run", **{"adapter.rank_budget": 14})
    larger.restore_or_init({"position": 0})
    assert int(larger.state["alloc"]["budget_left"]) == 14 - total
    same = _trainer(tmp_path / "run")
    same.restore_or_init({"position": 0})
    assert int(same.state["alloc"]["budget_left"]) == int(final_state["alloc"]["budget_left"])
    for t in (smaller, larger, same):
        t.close()


# ------------------------------------------------------------------------------------------------ backbone identity


def test_backbone_identity_is_by_content_not_path(tmp_path):
    from adapad_jax.testing import tiny

    ckpt = tiny.build_tiny_deberta(tmp_path / "ckpt", task="classification", seed=1)
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    other = tiny.build_tiny_deberta(tmp_path / "other", task="classification", seed=2)  # same shapes
    deeper = tiny.build_tiny_deberta(tmp_path / "deeper", task="classification", seed=1, num_hidden_layers=3)
    out = tmp_path / "run"
    out.mkdir()
    write_backbone_fingerprint(out, ckpt)
    assert check_backbone(out, copy, str(copy))
    with pytest.raises(ConfigError, match="different weight files"):
        check_backbone(out, other, str(other))
    with pytest.raises(ConfigError, match="different config.json"):
        check_backbone(out, deeper, str(deeper))
    assert backbone_fingerprint(ckpt) == backbone_fingerprint(copy)

    previous, config = base_config(), base_config()
    previous.model.name_or_path, config.model.name_or_path = str(ckpt), str(ckpt) + "/"
    check_resume(config, previous.to_json())  # a trailing slash is not a change
    config.model.name_or_path = str(copy)
    with pytest.raises(ConfigError, match="model.name_or_path"):
        check_resume(config, previous.to_json())
    check_resume(config, previous.to_json(), same_backbone=True)


# ------------------------------------------------------------------------------------------------ one run per dir

HOLDER = textwrap.dedent(
    """
    import sys, time
    from adapad_jax.run.lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("LOCKED", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(60)
    else:
        import os
        os._exit(0)  # dies without releasing: the record stays behind
    """
)


def _holder(lock_dir, mode):
    """Another process that takes the lock of ``lock_dir`` and holds it ("hold") or dies at once ("die")."""
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_second_process_is_refused_while_the_first_holds_the_output_dir(tmp_path):
    holder = _holder(tmp_path, "hold")
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(OutputDirInUse, match=f"in use by another run \\(pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the lock died with its holder
        pass


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    holder = _holder(tmp_path, "die")
    holder.communicate(timeout=60)
    messages = []
    lock = RunLock(tmp_path, log=messages.append)
    lock.acquire()
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0] and "not running" in messages[0]
    lock.release()
    record = json.loads((tmp_path / ".adapad.lock").read_text() or "{}")
    assert record == {}, "a clean exit clears the record"


def test_a_lock_record_from_another_host_is_refused(tmp_path):
    (tmp_path / ".adapad.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(OutputDirInUse, match="on another host.*remove"):
        RunLock(tmp_path).acquire()


# ------------------------------------------------------------------------------------------------ outputs as a set


def _previous_outputs(out: Path) -> dict[str, str]:
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text('{"step": 2}')
    (out / "ranks.json").write_text('{"step": 2}')
    (out / "eval_results.json").write_text('{"step": 2}')
    return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "Read-only file system")])
def test_a_failed_write_leaves_the_previous_set_intact_and_says_where(tmp_path, code, words):
    before = _previous_outputs(tmp_path)

    def write(staging: Path) -> None:
        (staging / "eval_results.json").write_text('{"step": 4}')
        (staging / "ranks.json").write_text('{"step": 4}')
        raise OSError(code, os.strerror(code), str(staging / "adapter" / "adapter_model.safetensors"))

    with pytest.raises(OutputWriteError) as caught:
        publish_set(tmp_path, ("adapter", "ranks.json", "eval_results.json"), write)
    message = str(caught.value)
    assert words in message and "adapter_model.safetensors" in message and "\n" not in message
    after = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_a_set_is_swapped_in_whole_with_the_users_umask(tmp_path):
    _previous_outputs(tmp_path)
    old = os.umask(0o027)
    try:
        def write(staging: Path) -> None:
            (staging / "adapter").mkdir()
            (staging / "adapter" / "adapter_config.json").write_text('{"step": 4}')
            (staging / "ranks.json").write_text('{"step": 4}')
            output_set.write_json_atomic(staging / "eval_results.json", {"step": 4})

        publish_set(tmp_path, ("adapter", "ranks.json", "eval_results.json"), write)
        output_set.write_text_atomic(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    for name in ("adapter/adapter_config.json", "ranks.json", "eval_results.json"):
        assert json.loads((tmp_path / name).read_text()) == {"step": 4}, name
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "config.json", "eval_results.json", "ranks.json"]


def test_export_to_an_existing_file_is_one_line(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "export.py"), "--run_dir", str(tmp_path), "--out", str(target)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == EXIT_BAD_INPUT
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --out '{target}' exists and is a file: give a directory (new or existing) to "
                      "export into"]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ whole runs


def _tiny_run(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_e2e_runs import tiny_run_config

    config = tiny_run_config(tmp_path, "glue_rte", "deberta")
    config.train.num_steps = 2
    return config


def test_run_refuses_an_output_dir_held_by_another_process(tmp_path):
    config = _tiny_run(tmp_path)
    out = Path(config.output_dir)
    out.mkdir()
    holder = _holder(out, "hold")
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(OutputDirInUse, match=f"pid {holder.pid}"):  # up front, before loading the model
            run_lib.run(config, progress=False, log=lambda _: None)
        with pytest.raises(OutputDirInUse, match=f"pid {holder.pid}"):  # and when it is taken, before writing
            run_lib.take_output_dir(out, None, lambda _: None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".adapad.lock"], "nothing written by the refused run"


@pytest.mark.slow
def test_disk_full_during_the_final_export_keeps_the_previous_outputs_whole(tmp_path, monkeypatch):
    config = _tiny_run(tmp_path)
    out = Path(config.output_dir)
    run_lib.run(config, progress=False, log=lambda _: None)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
              if p.is_file() and p.name in ("eval_results.json", "predictions.jsonl", "ranks.json")
              or p.parent.name == "adapter"}
    assert json.loads((out / "eval_results.json").read_text())["step"] == 2

    import adapad_jax.models.export as export_lib

    def full_disk(directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "adapter_model.safetensors"))

    monkeypatch.setattr(export_lib, "write_peft_adapter", full_disk)
    config.train.num_steps, config.train.extend_schedule = 4, True
    with pytest.raises(OutputWriteError, match="no space left on the device writing .*adapter_model.safetensors"):
        run_lib.run(config, progress=False, log=lambda _: None)
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before, "eval_results, predictions, ranks and adapter still describe step 2"
    assert not [p for p in out.iterdir() if p.name.startswith(".outputs-")], "no staging left behind"
    monkeypatch.undo()
    run_lib.run(config, progress=False, log=lambda _: None)  # the step-4 checkpoint was kept: evaluates it
    assert json.loads((out / "eval_results.json").read_text())["step"] == 4


@pytest.mark.parametrize("error, code", [(Diverged("diverged at step 3"), 3), (OutputWriteError("disk full"), 74),
                                         (ConfigError("bad field"), 2)])
def test_run_failures_end_in_one_line_with_their_exit_code(error, code, capsys):
    from adapad_jax.runtime.failures import Preempted

    with pytest.raises(SystemExit) as caught:
        with cli_errors.user_errors():
            raise error
    assert caught.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(SystemExit) as caught:
        with cli_errors.user_errors():
            raise Preempted("stopped")
    assert caught.value.code == 75


@pytest.mark.slow
def test_the_command_line_falls_back_from_a_damaged_checkpoint_without_tracebacks(tmp_path):
    config = _tiny_run(tmp_path)
    config.train.num_steps = 4
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text(config.to_json())
    (tmp_path / "cfg.py").write_text(
        "from adapad_jax.run.saved_run import load_run_config\n\ndef get_config():\n"
        f"    return load_run_config({str(tmp_path / 'saved')!r})\n")
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(tmp_path / "cfg.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    run_lib.run(config, progress=False, log=lambda _: None)
    _damage(Path(config.output_dir) / "checkpoints" / "4", "truncated data file")
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and "Event loop" not in second.stderr
    assert "warning: checkpoint step 4" in second.stderr and "resuming" in second.stdout + second.stderr
    assert json.loads((Path(config.output_dir) / "eval_results.json").read_text())["step"] == 4


@pytest.mark.slow
def test_two_jax_processes_both_refuse_an_output_dir_held_by_another_run(tmp_path):
    """Both processes stop with one line (exit 2) instead of one of them hanging in a collective."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_multiprocess import CONFIG_FILE, _free_port, _run_fields

    from adapad_jax.testing import tiny

    tiny.build_tiny_deberta(tmp_path / "ckpt", task="classification", seed=1)
    files = tiny.write_tiny_glue(tmp_path / "data", "glue_sst2", n_train=32, n_val=12)
    out = tmp_path / "multi"
    out.mkdir()
    config_path = tmp_path / "config.py"
    config_path.write_text(CONFIG_FILE.format(fields=json.dumps(_run_fields(tmp_path, files, out))))
    holder = _holder(out, "hold")
    port = _free_port()
    procs = []
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        for process_id in range(2):
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(process_id), PYTHONPATH=str(ROOT))
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                                           str(config_path)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        holder.kill()
        holder.wait()
    assert [p.returncode for p in procs] == [EXIT_BAD_INPUT, EXIT_BAD_INPUT], [r[1][-2000:] for r in results]
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for _, err in results]
    for lines in errors:  # each process checks up front; a race past that is settled by process 0's lock
        assert len(lines) == 1 and f"in use by another run (pid {holder.pid}" in lines[0]
    assert not (out / "config.json").exists()


# ------------------------------------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted at ``tmp_path/disk`` (root only): real ENOSPC from every storage layer."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                             text=True, timeout=30)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs for the disk-full tests: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def fill(disk: Path, leave_kib: int = 0) -> Path:
    """Fill ``disk`` with a ballast file up to ENOSPC, then give ``leave_kib`` KiB back; the ballast's path."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as err:
        assert err.errno == errno.ENOSPC
        block = 4096
        while True:  # the last few pages
            try:
                os.write(fd, b"\0" * block)
            except OSError:
                if block == 1:
                    break
                block //= 2
        os.ftruncate(fd, max(os.fstat(fd).st_size - leave_kib * 1024, 0))
    finally:
        os.close(fd)
    return ballast


def _no_partial_checkpoints(out: Path) -> bool:
    return not [p for p in out.rglob("*") if "orbax-checkpoint-tmp" in p.name]


@pytest.mark.parametrize("leave_kib", [0, 48])  # 0: the metadata file's write (OSError); 48: tensorstore's
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoints(small_disk, leave_kib):
    out = small_disk / "run"
    trainer = _trainer(out)
    _train(trainer, 2)
    ballast = fill(small_disk, leave_kib)
    data = ToyBatches(trainer.model, planted_teacher(trainer.model, [2, 1, 0, 0]), 8, start=2)
    with pytest.raises(OutputWriteError, match="checkpoint for step 4 not saved: no space left on the device") as e:
        trainer.train(data, 4, data.state, progress=False)
    assert "\n" not in str(e.value) and "MiB free there" in str(e.value)
    assert trainer.checkpointer.all_steps() == [2]
    assert _no_partial_checkpoints(out), [str(p) for p in out.rglob("*orbax-checkpoint-tmp*")]
    ballast.unlink()
    trainer.close()
    again = _trainer(out)
    assert again.restore_or_init({"position": 0}) == {"position": 2} and again.step == 2
    again.close()


FILLING_LAUNCHER = textwrap.dedent("""
    # adapad-train / adapad-export that fill the disk at one moment: FILL_AT=checkpoint:<step> (after that
    # checkpoint is saved) or FILL_AT=safetensors (before the adapter weights are written); FILL_LEAVE_KIB given back.
    import os, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_robustness import fill
    from adapad_jax.models import export as export_lib
    from adapad_jax.training import checkpointing

    disk, where = Path(os.environ["FILL_DISK"]), os.environ["FILL_AT"]
    leave = int(os.environ.get("FILL_LEAVE_KIB", "0"))
    save, save_file = checkpointing.Checkpointer.save, export_lib.save_file

    def filled_after_save(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if where == f"checkpoint:{{step}}":
            fill(disk, leave)

    def filled_before_save_file(*args, **kwargs):
        if where == "safetensors":
            fill(disk, leave)
        return save_file(*args, **kwargs)

    checkpointing.Checkpointer.save = filled_after_save
    export_lib.save_file = filled_before_save_file
    if sys.argv.pop(1) == "train":
        from adapad_jax.cli.train import main
    else:
        from adapad_jax.cli.export import main
    main()
""")


def _only_one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_the_commands_on_a_full_disk_end_in_one_line_release_the_lock_and_resume(tmp_path, small_disk):
    """Real ENOSPC under adapad-train (a checkpoint, then the final export) and adapad-export (safetensors): exit 74,
    one line, the lock record cleared, no orbax tmp folder, no staging or empty export folder; freeing space resumes."""
    config = _tiny_run(tmp_path)
    config.train.num_steps = 4
    out = small_disk / "run"
    config.output_dir = str(out)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text(config.to_json())
    (tmp_path / "cfg.py").write_text(
        "from adapad_jax.run.saved_run import load_run_config\n\ndef get_config():\n"
        f"    return load_run_config({str(tmp_path / 'saved')!r})\n")
    (tmp_path / "launch.py").write_text(FILLING_LAUNCHER.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FILL_DISK": str(small_disk), "ADAPAD_MALLOC": "system",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def launch(command, fill_at, *args, leave_kib=48):
        return subprocess.run([sys.executable, str(tmp_path / "launch.py"), command, *args], capture_output=True,
                              text=True, timeout=600, env={**env, "FILL_AT": fill_at, "FILL_LEAVE_KIB": str(leave_kib)})

    def lock_record() -> str:
        return (out / ".adapad.lock").read_text() if (out / ".adapad.lock").exists() else ""

    train = ("train", "--config", str(tmp_path / "cfg.py"))
    line = _only_one_error_line(launch(train[0], "checkpoint:2", *train[1:]), 74)
    assert "checkpoint for step 4 not saved: no space left on the device" in line
    assert lock_record() == "" and _no_partial_checkpoints(out)
    assert run_lib.has_checkpoints(out) and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]

    (small_disk / "ballast").unlink()
    resumed = launch(train[0], "safetensors", *train[1:], leave_kib=0)  # the final export meets a full disk
    line = _only_one_error_line(resumed, 74)
    assert f"resuming {out} from step 2" in resumed.stdout + resumed.stderr
    assert "outputs not written, the previous ones are intact: no space left on the device" in line
    assert lock_record() == "" and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".outputs-") or p.name == "adapter"]

    (small_disk / "ballast").unlink()
    exported = launch("export", "safetensors", "--run_dir", str(out), leave_kib=0)
    assert "no space left on the device" in _only_one_error_line(exported, 74)
    assert not (out / "export-step4").exists() and not [p for p in out.iterdir() if p.name.startswith(".outputs-")]

    under_a_file = launch("export", "none", "--run_dir", str(out), "--out", str(out / "config.json" / "sub"))
    assert "is a file, not a directory" in _only_one_error_line(under_a_file, 2)


def test_a_storage_layers_own_error_is_recognised_as_a_write_failure(tmp_path):
    """tensorstore (orbax's array writes) and safetensors report the OS error only in their message."""
    import tensorstore as ts
    from safetensors.numpy import save_file

    from adapad_jax.runtime.failures import describe_os_error, os_error_in_chain

    (tmp_path / "file").write_text("x")
    caught = []
    with pytest.raises(ValueError) as tensorstore_error:
        ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "file" / "z") + "/"}},
                create=True, dtype=ts.float32, shape=[3]).result()
    caught.append(tensorstore_error.value)
    with pytest.raises(Exception) as safetensors_error:
        save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "file" / "a.safetensors"))
    caught.append(safetensors_error.value)
    for err in caught:
        wrapped = RuntimeError("a library wraps it")
        wrapped.__cause__ = err
        found = os_error_in_chain(wrapped)
        assert found is not None and found.errno == errno.ENOTDIR, repr(err)
        assert describe_os_error(found, tmp_path / "file" / "z") == (
            f"cannot write {tmp_path / 'file' / 'z'}: a part of that path is a regular file, not a directory")
    assert os_error_in_chain(ValueError("RESOURCE_EXHAUSTED: a quota, no OS error")) is None


def test_an_output_dir_below_a_regular_file_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    config = base_config()
    config.output_dir = str(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_lib.check(config)


def test_a_config_whose_get_config_returns_none_is_named(tmp_path):
    (tmp_path / "cfg.py").write_text("def get_config():\n    pass\n")
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(tmp_path / "cfg.py")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == EXIT_BAD_INPUT
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "returned None from get_config()" in errors[0] and "cfg.py" in errors[0]


def test_a_metrics_write_error_is_one_line(tmp_path, monkeypatch):
    from adapad_jax.outputs.rank_outputs import MetricsWriter

    writer = MetricsWriter(tmp_path / "metrics.jsonl")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(OutputWriteError, match="metrics not logged: no space left on the device writing .*metrics"):
        writer.write({"step": 1})


@pytest.mark.parametrize("package, logged", [("orbax", False), ("elsewhere", True)])
def test_orphaned_orbax_read_tasks_are_not_logged_but_other_task_errors_are(tmp_path, caplog, package, logged):
    """A damaged checkpoint fails several orbax reads at once; the ones nobody awaits must not print tracebacks
    (asyncio's "Task exception was never retrieved"), while task errors from any other code still do."""
    import asyncio
    import gc
    import importlib.util

    from adapad_jax.training import recovery

    (tmp_path / package).mkdir()
    source = tmp_path / package / "reads.py"
    source.write_text("async def read():\n    raise ValueError('truncated data file')\n")
    spec = importlib.util.spec_from_file_location(f"_fake_{package}_reads", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recovery.read_or_damaged(1, lambda: None)  # installs the filter, as every checkpoint read does
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(module.read())
        loop.run_until_complete(asyncio.wait([task]))
        del task
        gc.collect()
    finally:
        loop.close()
    assert ("Task exception was never retrieved" in caplog.text) == logged, caplog.text


def test_a_training_file_without_one_batch_is_refused_before_output_dir_is_touched(tmp_path):
    """One row, batch size 8: one line (DataError), and no lock, config.json or orbax checkpoint directory made."""
    from adapad_jax.data.tasks import DataError

    config = _tiny_run(tmp_path)
    one_row = tmp_path / "one.jsonl"
    one_row.write_text(Path(config.data.train_file).read_text().splitlines()[0] + "\n")
    config.data.train_file = str(one_row)
    with pytest.raises(DataError, match="the training set has 1 examples, fewer than one batch of 8"):
        run_lib.run(config, progress=False, log=lambda _: None)
    assert not Path(config.output_dir).exists()
