"""A finished (or running) run's directory read back: its config, one restored checkpoint, and export from it.

Everything here only reads the run directory; export writes into ``--out`` (default ``<run_dir>/export-step<N>``)
through ``output_set.publish_set``. Imports of JAX and the models / training / data packages are function-local,
as in ``run.py``: a bad run directory or ``--step`` is reported before any of them loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections

from adapad_jax.config.schema import ConfigError
from adapad_jax.config.validation import check_output_dir_path
from adapad_jax.runtime.distributed import is_main_process
from adapad_jax.outputs.output_set import publish_set
from adapad_jax.runtime.failures import CheckpointMoved
from adapad_jax.run.checks import CheckedRun
from adapad_jax.run.core import (
    export_trainer, has_checkpoints, load_model_for, reachable_budget, with_resume_changes,
)
from adapad_jax.outputs.layout import CHECKPOINTS_DIR, CONFIG_FILE, EVAL_RESULTS_FILE, EXPORTED_OUTPUTS, RESUMES_FILE


def load_run_config(run_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run's checkpoints were trained with: its config.json plus the changes its resumes recorded.

    Checked like a user's config (``validation.check_fields``): a field of the wrong type is one ConfigError.
    """
    from adapad_jax.config.schema import base_config
    from adapad_jax.config.validation import check_fields

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory: it has no {CONFIG_FILE}")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a run config: it holds a JSON {type(saved).__name__}, not an object")
    config = base_config()
    where = f"{path} (with {RESUMES_FILE})" if (Path(run_dir) / RESUMES_FILE).is_file() else str(path)
    _merge(config, with_resume_changes(saved, Path(run_dir)), "", where)
    try:
        check_fields(config, installed_packages=False)  # exporting needs no logging package
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


def _merge(config: ml_collections.ConfigDict, saved: Mapping[str, Any], prefix: str, where: str) -> None:
    for key, value in saved.items():
        known = key in config
        if isinstance(value, dict) and (not known or isinstance(config[key], ml_collections.ConfigDict)):
            if not known:
                config[key] = ml_collections.ConfigDict()
            _merge(config[key], value, f"{prefix}{key}.", where)
            continue
        if known and isinstance(config[key], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            config[key] = value
        except TypeError:  # ml_collections keeps each field's type
            expected = type(config[key]).__name__
            raise ConfigError(
                f"{where}: {prefix}{key} must be {expected}, got {type(value).__name__} {value!r}"
            ) from None


@dataclasses.dataclass
class RestoredRun:
    """A run's model with one of its checkpoints restored (see ``restored_run``)."""

    run_dir: Path
    config: ml_collections.ConfigDict
    checked: CheckedRun
    model: Any
    trainer: Any
    step: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def default_step(run_dir: Path, config: ml_collections.ConfigDict, steps: list[int]) -> tuple[int, str]:
    """The checkpoint export / predict use without ``--step``, and why: the step the run exported (its best with
    ``train.select_best``); while the run has exported none, its best evaluated checkpoint so far, else the newest."""
    results = _read_json(run_dir / EVAL_RESULTS_FILE)
    exported = results.get("step")
    if isinstance(exported, int) and exported in steps:
        key, last_step = results.get("main_metric"), results.get("last_step")
        if not key or "best_step" not in results:
            return exported, "the step the run exported (its last; train.select_best is off)"
        best = _number(results.get("best_metrics", {}).get(key))
        if last_step == exported:
            return exported, f"the run's best checkpoint, which it exported ({key} {best}, at its last step)"
        last = _number(results.get("last_metrics", {}).get(key))
        return exported, (f"the run's best checkpoint, which it exported ({key} {best}; the last step, {last_step}, "
                          f"had {last})")
    gone = f"the step the run exported, {exported}, is no longer in checkpoints/" if isinstance(exported, int) \
        else "the run has not exported an adapter yet"
    if config.train.select_best:
        from adapad_jax.training.checkpointing import Checkpointer
        from adapad_jax.training.trainer import best_checkpoint_metric

        reader = Checkpointer(run_dir / CHECKPOINTS_DIR, keep=0, read_only=True, best=best_checkpoint_metric(config))
        try:
            best_step = reader.best_step()
        finally:
            reader.close()
        if best_step in steps:
            return best_step, f"the best evaluated checkpoint so far ({gone})"
    return steps[-1], f"the newest checkpoint ({gone})"


def _check_local_model(run_dir: Path, name_or_path: str) -> None:
    """A run's local base model that is gone gets its own line (not the hub's "not in the local cache")."""
    path = os.path.expanduser(name_or_path)
    if os.path.isabs(path) and not os.path.exists(path):
        raise ConfigError(f"the base model of run '{run_dir}', the local directory '{name_or_path}' "
                          f"(model.name_or_path in its {CONFIG_FILE}), no longer exists: put the checkpoint back there")


@contextlib.contextmanager
def restored_run(run_dir: str | os.PathLike, step: int | None = None, log: Callable[[str], None] | None = None):
    """Rebuild a run's model from its config.json and restore checkpoint ``step``; yields RestoredRun.

    ``step`` None: ``default_step`` (the step the run exported). ``log`` gets one line naming the step and why.
    Reads the run directory only (the trainer writes into a scratch directory). With several processes every
    process must enter it (the mesh spans every device, adapters replicated).
    """
    import jax

    from adapad_jax.config.validation import task_spec_for
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import load_hf_config
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.training.checkpointing import Checkpointer

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    checkpoints = run_dir / CHECKPOINTS_DIR
    if not has_checkpoints(run_dir):
        raise ConfigError(f"run directory '{run_dir}' has no checkpoints")
    reader = Checkpointer(checkpoints, keep=0, read_only=True)
    try:
        steps = reader.all_steps()
    finally:
        reader.close()
    if step is None:
        step, why = default_step(run_dir, config, steps)
        why += "; --step N picks another"
    elif step not in steps:
        raise ConfigError(f"run directory '{run_dir}' has no checkpoint for step {step} (it has {steps})")
    else:
        why = f"--step {step}"
    if log is not None and is_main_process():
        log(f"using checkpoint step {step} of {run_dir}: {why}")
    _check_local_model(run_dir, str(config.model.name_or_path))
    try:
        checkpoint_dir, hf_config = load_hf_config(config.model.name_or_path, revision=config.model.get("revision") or None)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    spec = task_spec_for(config)
    checked = CheckedRun(spec, checkpoint_dir, hf_config, num_modules=0)
    model = load_model_for(config, checked)
    # One device is enough to restore (the checkpoint restores onto any mesh); several processes must all hold
    # part of the mesh, so then it spans every device with the adapters replicated.
    if jax.process_count() > 1:
        mesh = make_mesh(jax.device_count(), 1)
    else:
        mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    with tempfile.TemporaryDirectory() as scratch:
        # The trainer's own output_dir is a scratch dir so that nothing in the run directory is appended to.
        trainer = Trainer(model, config, mesh, scratch, checkpoint_dir=checkpoints)
        try:
            try:
                trainer.restore(step)
            except ValueError as err:
                if not (checkpoints / str(step)).is_dir():
                    raise CheckpointMoved(
                        f"checkpoint step {step} of {run_dir} was removed while it was being read (a running "
                        "training rotates old checkpoints out, see checkpoint.keep); run the command again"
                    ) from None
                raise ConfigError(str(err)) from None
            yield RestoredRun(run_dir, config, checked, model, trainer, step)
        finally:
            trainer.close()


def export_checkpoint(
    run_dir: str | os.PathLike, *, step: int | None = None, out_dir: str | None = None, merged: bool = False,
    log: Callable[[str], None] = print, merged_dtype: str = "float32",
) -> Path:
    """Rebuild a run's model, restore one of its checkpoints and write the PEFT adapter (+ merged checkpoint).

    Reads the run directory only. With several processes every process restores and only process 0 writes.
    ``merged_dtype``: float32 or bfloat16 weights in ``merged/`` (which also gets the tokenizer files).
    """
    from adapad_jax.outputs.model_card import metrics_at_step, write_merged_model_card, write_model_card

    if merged_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"merged dtype '{merged_dtype}' is not one of float32, bfloat16")
    if out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out '{out_dir}' exists and is a file: give a directory (new or existing) to export into")
    if out_dir:
        check_output_dir_path(Path(out_dir), "--out")
    with restored_run(run_dir, step, log) as restored:
        trainer, model, step = restored.trainer, restored.model, restored.step
        out = Path(out_dir) if out_dir else Path(run_dir) / f"export-step{step}"
        accounting = trainer.accounting()  # every process joins its gather
        if not is_main_process():
            export_trainer(trainer, None)
            if merged:
                trainer.trained_params(), trainer.committed_peft_factors()
            return out
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            from adapad_jax.runtime.failures import OutputWriteError, describe_os_error

            raise OutputWriteError(describe_os_error(err, out)) from None

        def write(staging: Path) -> None:
            export_trainer(trainer, staging)
            metrics = metrics_at_step(run_dir, step)
            base_dir, reachable = restored.checked.checkpoint_dir, reachable_budget(trainer)
            if (staging / "adapter").is_dir():
                write_model_card(staging / "adapter", restored.config, metrics, step, model.hf_config.model_type,
                                 base_dir=base_dir, accounting=accounting, reachable_budget=reachable)
            if merged:
                from adapad_jax.data import load_tokenizer
                from adapad_jax.models.export import write_merged_checkpoint

                write_merged_checkpoint(
                    staging / "merged", model, trainer.trained_params(), trainer.committed_peft_factors(),
                    trainer.scaling, dtype=merged_dtype,
                )
                load_tokenizer(str(restored.checked.checkpoint_dir)).save_pretrained(str(staging / "merged"))
                write_merged_model_card(staging / "merged", trainer.ranks(), restored.config, metrics, step,
                                        merged_dtype, base_dir=base_dir, reachable_budget=reachable)

        try:
            publish_set(out, EXPORTED_OUTPUTS + ("merged",), write)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when the failed export left it empty
            raise
    log(f"exported step {step} of {run_dir} to {out}")
    return out
