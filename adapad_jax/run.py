"""One run from a config: validate, load model and data, build the mesh and trainer, train, evaluate, write outputs.

Order matters for the user's contract: every check (``adapad_jax.config.validate_config``) runs before any
model weights or data are loaded and before ``output_dir`` is created or touched. Every file this module
writes into ``output_dir`` is written to a temporary name and renamed into place, so a run that dies leaves
the previous version of each output intact. Rerunning on an ``output_dir`` with checkpoints resumes.

Several processes (``initialize_distributed``): every process runs the same ``run``; each feeds its block of
every global batch, evaluation outputs are gathered to every process, and only process 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_collections
import numpy as np

from adapad_jax.config import CheckedRun, ConfigError, check_resume, validate_config

CONFIG_FILE = "config.json"
EVAL_RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.jsonl"
EXPORTED_OUTPUTS = ("adapter", "ranks.json", "ranks.png", "allocator.json")
# The three variables that start JAX's multi-process runtime (see initialize_distributed).
DISTRIBUTED_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Set to "auto" to let jax.distributed.initialize() detect a cluster (SLURM, Open MPI, Kubernetes, TPU pods).
DISTRIBUTED_AUTO_VAR = "ADAPAD_DISTRIBUTED"


@dataclasses.dataclass
class RunResult:
    """What a finished run hands back: where it wrote, its final metrics, ranks and step."""

    output_dir: Path
    metrics: dict[str, float]
    ranks: dict[str, int]
    step: int
    num_steps: int
    trainer: Any = None  # the Trainer, kept open only when run(..., keep_trainer=True)
    data: Any = None  # the TaskData (same condition)


# ---------------------------------------------------------------------------------------------- processes


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


# ---------------------------------------------------------------------------------------------- atomic files


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented) through ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line through ``write_text_atomic``."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def replace_path(new: Path, target: Path) -> None:
    """Move ``new`` (file or directory) onto ``target``; an existing directory is swapped out, then removed."""
    if new.is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(new, target)


def export_outputs(trainer: Any, output_dir: Path, extra_dir: str | None = None) -> None:
    """``trainer.export`` into a temporary directory inside ``output_dir``, then rename each output into place.

    Every process must call it (the export gathers the adapters); only process 0 writes.
    """
    if not is_main_process():
        trainer.export(None)
        return
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".export-"))
    try:
        trainer.export(staging)
        target_dir = output_dir if extra_dir is None else Path(extra_dir)
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in EXPORTED_OUTPUTS:
            if (staging / name).exists():
                replace_path(staging / name, target_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- run pieces


def has_checkpoints(output_dir: Path) -> bool:
    """True when ``output_dir/checkpoints`` holds at least one finished orbax step."""
    directory = output_dir / "checkpoints"
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


def resolve_num_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``train.num_steps`` when >= 0, else ``train.num_epochs`` x ``steps_per_epoch``."""
    if config.train.num_steps >= 0:
        return int(config.train.num_steps)
    return int(config.train.num_epochs) * int(steps_per_epoch)


def _model_task(kind: str) -> str:
    return {"classification": "classification", "regression": "regression", "qa": "qa"}[kind]


def model_config_overrides(checked: CheckedRun) -> dict[str, Any]:
    """Fields to set on the checkpoint's config: ``pad_token_id`` from the tokenizer when the config has none.

    Qwen3 checkpoints (e.g. Qwen/Qwen3-0.6B) carry no ``pad_token_id``, which sequence classification needs to
    find the last real token of padded rows; the tokenizer's pad token (eos when it has none) is what pads them.
    """
    if getattr(checked.hf_config, "pad_token_id", None) is not None:
        return {}
    from adapad_jax.data import load_tokenizer

    pad_token_id = load_tokenizer(str(checked.checkpoint_dir)).pad_token_id
    return {} if pad_token_id is None else {"pad_token_id": int(pad_token_id)}


def load_model_for(config: ml_collections.ConfigDict, checked: CheckedRun) -> Any:
    """The Flax model for the config's task, with the checkpoint's weights."""
    import jax.numpy as jnp

    from adapad_jax.models.registry import load_model

    spec = checked.task_spec
    return load_model(
        str(checked.checkpoint_dir),
        task=_model_task(spec.kind),
        num_labels=spec.num_labels,
        dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32,
        target_names=tuple(config.adapter.target_modules) or None,
        adapter_dropout=float(config.adapter.dropout),
        classifier_dropout=float(config.model.classifier_dropout),
        seed=int(config.seed),
        config_overrides=model_config_overrides(checked),
    )


def load_data_for(config: ml_collections.ConfigDict, checked: CheckedRun, model: Any, include_train: bool) -> Any:
    """Tokenised train features and eval sets with the checkpoint's own tokenizer."""
    from adapad_jax.data import build_task_data_from_config, load_tokenizer

    return build_task_data_from_config(
        config,
        load_tokenizer(str(checked.checkpoint_dir)),
        task=checked.task_spec,
        include_train=include_train,
        with_token_type_ids=bool(model.uses_token_type_ids),
    )


def predict_split(trainer: Any, eval_set: Any, batch_size: int) -> dict[str, np.ndarray]:
    """Model outputs on every row of one eval set (the padded last batch trimmed), gathered from every process."""
    from adapad_jax.data import concat_eval_outputs, eval_batches

    process_index, process_count = trainer.batch_slice
    batches = eval_batches(eval_set.features, batch_size, process_index=process_index, process_count=process_count)
    outputs = [trainer.predict(batch) for batch in batches]
    return concat_eval_outputs(outputs, eval_set.num_features)


def evaluate(trainer: Any, data: Any, batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics over every validation split and the predictions.jsonl rows."""
    from adapad_jax.metrics import evaluate_task

    outputs = {split: predict_split(trainer, eval_set, batch_size) for split, eval_set in data.evals.items()}
    return evaluate_task(data, outputs)


# ---------------------------------------------------------------------------------------------- entry point


def check(config: ml_collections.ConfigDict) -> CheckedRun:
    """All up-front checks against this process's devices and the output directory's previous run."""
    import jax

    devices = jax.devices()
    checked = validate_config(config, num_devices=len(devices), platform=devices[0].platform)
    mesh_size = int(config.mesh.data) * int(config.mesh.components)
    if jax.process_count() > 1 and mesh_size != len(devices):
        raise ConfigError(
            f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices: "
            f"mesh.data={config.mesh.data} x mesh.components={config.mesh.components} = {mesh_size}"
        )
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir '{output_dir}' exists and is not a directory")
    if has_checkpoints(output_dir) and (output_dir / CONFIG_FILE).is_file():
        check_resume(config, (output_dir / CONFIG_FILE).read_text())
    return checked


def run(
    config: ml_collections.ConfigDict,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_trainer: bool = False,
) -> RunResult:
    """Validate, then train (resuming from ``output_dir`` when it has checkpoints), evaluate and export."""
    from adapad_jax.config import check_fields

    check_fields(config)  # cheap field checks first, before the demo builds anything
    if config.task == "demo":
        from adapad_jax import demo

        demo.prepare_config(config, log=log)
    checked = check(config)
    from adapad_jax.compilation_cache import enable_persistent_cache

    enable_persistent_cache(config.compilation_cache_dir)  # before this run's first compile
    main_process = is_main_process()
    if not main_process:
        progress, log = False, _ignore
    if not progress:
        import datasets

        datasets.disable_progress_bars()

    from adapad_jax.data import TrainBatches
    from adapad_jax.training import Trainer, make_mesh

    model = load_model_for(config, checked)
    want_train = config.train.num_steps != 0
    data = load_data_for(config, checked, model, include_train=want_train)
    if want_train and data.train is None:
        raise ConfigError(
            "training needs data: give data.train_file (or use a hub/tfds source), or set train.num_steps=0"
        )
    if not data.evals:
        raise ConfigError("no validation data: give data.validation_file (or use a hub/tfds source)")
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.components),
                     None if config.adapter.method == "lora" else int(config.adapter.r_max))

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if main_process:
        write_text_atomic(output_dir / CONFIG_FILE, config.to_json(indent=2) + "\n")

    trainer = Trainer(model, config, mesh, output_dir)
    try:
        batches = None
        if want_train:
            process_index, process_count = trainer.batch_slice
            batches = TrainBatches(
                data.train, int(config.train.batch_size), int(config.seed),
                process_index=process_index, process_count=process_count,
            )
        data_state = trainer.restore_or_init(batches.state_dict() if batches is not None else {})
        if batches is not None and data_state:
            batches.load_state_dict(data_state)
        num_steps = resolve_num_steps(config, batches.steps_per_epoch if batches is not None else 0)
        if trainer.step:
            log(f"resuming {output_dir} from step {trainer.step}")
        eval_batch = int(config.train.eval_batch_size)
        if num_steps > 0 and trainer.step < num_steps:
            log(f"training {config.adapter.method} for {num_steps} steps ({len(model.targets)} adapted modules)")
            trainer.train(
                batches,
                num_steps,
                data_state_fn=batches.state_dict,
                eval_fn=lambda t: evaluate(t, data, eval_batch)[0],
                eval_every=int(config.train.eval_every_steps),
                progress=progress,
            )
        metrics, rows = evaluate(trainer, data, eval_batch)
        step = trainer.step
        trainer.metrics.write({"step": step, "eval": metrics, "final": True})
        if main_process:
            write_json_atomic(output_dir / EVAL_RESULTS_FILE, {"task": config.task, "step": step, "metrics": metrics})
            write_jsonl_atomic(output_dir / PREDICTIONS_FILE, rows)
        export_outputs(trainer, output_dir)
        ranks = trainer.ranks()
        log(
            f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            + f"; total rank {sum(ranks.values())} over {len(ranks)} modules; outputs in {output_dir}"
        )
        result = RunResult(output_dir, metrics, ranks, step, num_steps)
        if keep_trainer:
            result.trainer, result.data = trainer, data
        return result
    finally:
        if not keep_trainer:
            trainer.close()


def _ignore(_: str) -> None:
    """A ``log`` that drops its message (processes other than 0)."""


# ---------------------------------------------------------------------------------------------- export


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


def export_checkpoint(
    run_dir: str | os.PathLike, *, step: int | None = None, out_dir: str | None = None, merged: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Rebuild a run's model, restore one of its checkpoints and write the PEFT adapter (+ merged checkpoint).

    Reads the run directory only. With several processes every process restores and only process 0 writes.
    """
    import jax

    from adapad_jax.config import task_spec_for
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import load_hf_config
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.training.checkpointing import Checkpointer

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    checkpoints = run_dir / "checkpoints"
    if not has_checkpoints(run_dir):
        raise ConfigError(f"run directory '{run_dir}' has no checkpoints to export")
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
        checkpoint_dir, hf_config = load_hf_config(config.model.name_or_path)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    spec = task_spec_for(config)
    checked = CheckedRun(spec, checkpoint_dir, hf_config, num_modules=0)
    model = load_model_for(config, checked)
    # One device is enough to restore and export (the checkpoint restores onto any mesh); several processes
    # must all hold part of the mesh, so then it spans every device with the adapters replicated.
    if jax.process_count() > 1:
        mesh = make_mesh(jax.device_count(), 1)
    else:
        mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    out = Path(out_dir) if out_dir else run_dir / f"export-step{step}"
    main_process = is_main_process()
    with tempfile.TemporaryDirectory() as scratch:
        # The trainer's own output_dir is a scratch dir so that nothing in the run directory is appended to.
        trainer = Trainer(model, config, mesh, scratch, checkpoint_dir=checkpoints)
        try:
            try:
                trainer.restore(step)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if not main_process:
                trainer.export(None)
                if merged:
                    trainer.trained_params(), trainer.committed_factors()
                return out
            out.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
            try:
                trainer.export(staging)
                if merged:
                    from adapad_jax.models.export import write_merged_checkpoint

                    write_merged_checkpoint(
                        staging / "merged", model, trainer.trained_params(), trainer.committed_factors(),
                        trainer.scaling,
                    )
                for name in EXPORTED_OUTPUTS + ("merged",):
                    if (staging / name).exists():
                        replace_path(staging / name, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            trainer.close()
    log(f"exported step {step} of {run_dir} to {out}")
    return out


# ---------------------------------------------------------------------------------------------- command lines


def start_command(argv: list[str], hint: str = "") -> None:
    """Shared start of the launch scripts: refuse positional arguments, quiet absl, start jax.distributed if asked."""
    from absl import logging

    if len(argv) > 1:
        fail(f"unexpected positional arguments {argv[1:]}{hint}")
    logging.set_verbosity(logging.WARNING)
    with user_errors():
        initialize_distributed()  # before anything touches a device


def fail(message: str, code: int = 2) -> None:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags_or_fail(argv: list[str]) -> list[str]:
    """absl flag parsing for ``app.run`` that reports a bad flag or config override as one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err)
        if "Traceback (most recent call last)" in message:  # get_config raised: keep the flag and the last line
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            message = f"{message.split(':', 1)[0]}: the config file raised {lines[-1]}"
        fail(message)
    except (AttributeError, KeyError) as err:
        fail(_unknown_field_message(argv, err))
    except Exception as err:  # noqa: BLE001 - a config file that fails to load raises anything
        fail(config_load_message(err))
    raise AssertionError("unreachable")


def config_load_message(err: BaseException) -> str:
    """One line for a config file that could not be loaded (missing, or raising in get_config)."""
    message = str(err)
    if "No such file or directory:" in message:
        return f"config file not found: {message.split('No such file or directory:')[-1].strip()}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"cannot load the config file: {' '.join(lines[-3:]) if lines else type(err).__name__}"


def loaded_config_or_fail(config: Any) -> Any:
    """config_flags reports a config file that failed to load only when the config is first read: do it here."""
    try:
        config.get("task")
    except OSError as err:
        fail(config_load_message(err))
    return config


def _unknown_field_message(argv: list[str], err: BaseException) -> str:
    """Name the ``--config.<field>`` override that does not exist (config_flags only reports the last key)."""
    text = str(err.args[0] if err.args else err).replace("\\'", "'")
    named = re.search(r"[\"']([A-Za-z_]\w*)[\"']", text)
    missing = named.group(1) if named else text
    suggestion = re.search(r"Did you mean \"?(\w+)\"?", text)
    hint = f" (did you mean \"{suggestion.group(1)}\" instead?)" if suggestion else ""
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        parts = name.split(".")
        if len(parts) > 1 and parts[0] != "" and missing in parts[1:]:
            field = ".".join(parts[1:])
            return f"unknown config field '{field}'{hint}; the fields are listed in adapad_jax/config.py:base_config"
    return f"unknown config field '{missing}'{hint}"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (config, model, data), reported without a traceback."""
    from adapad_jax.data.tasks import DataError
    from adapad_jax.models.checkpoint_io import CheckpointError

    types: list[type[BaseException]] = [ConfigError, DataError, CheckpointError]
    try:
        from adapad_jax.models.qwen3_modules import Qwen3ConfigError

        types.append(Qwen3ConfigError)
    except ImportError:
        pass
    return tuple(types)


@contextlib.contextmanager
def user_errors():
    """Turn bad-input exceptions raised inside the block into ``fail`` (one line, exit code 2)."""
    known = user_error_types()
    try:
        yield
    except known as err:
        fail(str(err))
