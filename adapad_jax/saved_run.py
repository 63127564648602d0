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

from adapad_jax.config import ConfigError
from adapad_jax.validation import CheckedRun
from adapad_jax.distributed import is_main_process
from adapad_jax.output_set import publish_set
from adapad_jax.run import CONFIG_FILE, EXPORTED_OUTPUTS, check_output_dir_path, has_checkpoints, load_model_for


def load_run_config(run_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its output directory."""
    from adapad_jax.config import base_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory: it has no {CONFIG_FILE}")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    config = base_config()
    _merge(config, saved, "")
    return config


def _merge(config: ml_collections.ConfigDict, saved: Mapping[str, Any], prefix: str) -> None:
    for key, value in saved.items():
        if isinstance(value, dict):
            if key not in config:
                config[key] = ml_collections.ConfigDict()
            _merge(config[key], value, f"{prefix}{key}.")
        elif key in config and isinstance(config[key], tuple):
            config[key] = tuple(value)
        else:
            config[key] = value


@dataclasses.dataclass
class RestoredRun:
    """A run's model with one of its checkpoints restored (see ``restored_run``)."""

    run_dir: Path
    config: ml_collections.ConfigDict
    checked: CheckedRun
    model: Any
    trainer: Any
    step: int


@contextlib.contextmanager
def restored_run(run_dir: str | os.PathLike, step: int | None = None):
    """Rebuild a run's model from its config.json and restore checkpoint ``step`` (None = newest); yields RestoredRun.

    Reads the run directory only (the trainer writes into a scratch directory). With several processes every
    process must enter it (the mesh spans every device, adapters replicated).
    """
    import jax

    from adapad_jax.validation import task_spec_for
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import load_hf_config
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.training.checkpointing import Checkpointer

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    checkpoints = run_dir / "checkpoints"
    if not has_checkpoints(run_dir):
        raise ConfigError(f"run directory '{run_dir}' has no checkpoints")
    reader = Checkpointer(checkpoints, keep=0, read_only=True)
    try:
        steps = reader.all_steps()
    finally:
        reader.close()
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"run directory '{run_dir}' has no checkpoint for step {step} (it has {steps})")
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
    from adapad_jax.models.model_card import metrics_at_step, write_merged_model_card, write_model_card

    if merged_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"merged dtype '{merged_dtype}' is not one of float32, bfloat16")
    if out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out '{out_dir}' exists and is a file: give a directory (new or existing) to export into")
    if out_dir:
        check_output_dir_path(Path(out_dir), "--out")
    with restored_run(run_dir, step) as restored:
        trainer, model, step = restored.trainer, restored.model, restored.step
        out = Path(out_dir) if out_dir else Path(run_dir) / f"export-step{step}"
        if not is_main_process():
            trainer.export(None)
            if merged:
                trainer.trained_params(), trainer.committed_peft_factors()
            return out
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            from adapad_jax.failures import OutputWriteError, describe_os_error

            raise OutputWriteError(describe_os_error(err, out)) from None

        def write(staging: Path) -> None:
            trainer.export(staging)
            metrics = metrics_at_step(run_dir, step)
            base_dir = restored.checked.checkpoint_dir
            if (staging / "adapter").is_dir():
                write_model_card(staging / "adapter", restored.config, metrics, step, model.hf_config.model_type,
                                 base_dir=base_dir)
            if merged:
                from adapad_jax.data import load_tokenizer
                from adapad_jax.models.export import write_merged_checkpoint

                write_merged_checkpoint(
                    staging / "merged", model, trainer.trained_params(), trainer.committed_peft_factors(),
                    trainer.scaling, dtype=merged_dtype,
                )
                load_tokenizer(str(restored.checked.checkpoint_dir)).save_pretrained(str(staging / "merged"))
                write_merged_model_card(staging / "merged", trainer.ranks(), restored.config, metrics, step,
                                        merged_dtype, base_dir=base_dir)

        try:
            publish_set(out, EXPORTED_OUTPUTS + ("merged",), write)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when the failed export left it empty
            raise
    log(f"exported step {step} of {run_dir} to {out}")
    return out
