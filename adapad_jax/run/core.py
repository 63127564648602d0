"""One run from a config: validate, load model and data, build the mesh and trainer, train, evaluate, write outputs.

Order matters for the user's contract: every check (``adapad_jax.run.checks.validate_config``) runs before any
model weights or data are loaded and before ``output_dir`` is created or touched. Every file this module
writes into ``output_dir`` is written to a temporary name and renamed into place, so a run that dies leaves
the previous version of each output intact. Rerunning on an ``output_dir`` with checkpoints resumes.

Several processes (``distributed.initialize_distributed``): every process runs the same ``run``; each feeds its
block of every global batch, evaluation outputs are gathered to every process, and only process 0 writes files
and logs. Reading a run directory back (export, predict) is ``saved_run``; the commands' error lines are
``cli/errors``.

Imports of JAX, ``datasets`` and the data / models / training / metrics packages are function-local on purpose:
a bad config is reported before any of them loads (well under a second), and JAX's multi-process runtime is
started by the command before anything imports JAX.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from adapad_jax.runtime import progress as progress_lib
from adapad_jax.runtime.compilation_cache import enable_persistent_cache
from adapad_jax.runtime.distributed import is_main_process
from adapad_jax.runtime.failures import OutputWriteError, describe_os_error, os_error_in_chain
from adapad_jax.runtime.host_malloc import release_free_heap
from adapad_jax.methods.allocator import rank_capacity
from adapad_jax.outputs.output_set import publish_set, write_json_atomic, write_jsonl_atomic, write_text_atomic
from adapad_jax.run.resume_identity import check_backbone, write_backbone_fingerprint
from adapad_jax.run.lock import acquire_for_all_processes, refuse_if_held
from adapad_jax.data.task_hooks import hooks_for
from adapad_jax.config.validation import (
    absolute_local_paths, check_fields, check_loaded_data, check_output_dir_is_directory, check_output_dir_path,
    check_processes_use_all_devices, has_slot_axis,
)
from adapad_jax.run.checks import CheckedRun, check_resume, validate_config

from adapad_jax.outputs.layout import (  # the run directory's names (outputs/layout.py owns them)
    CHECKPOINTS_DIR, CONFIG_FILE, EVAL_RESULTS_FILE, EXPORTED_OUTPUTS, PREDICTIONS_FILE, RESUMES_FILE,
)


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


# ---------------------------------------------------------------------------------------------- outputs


def export_trainer(trainer: Any, out_dir: str | Path | None = None) -> Path:
    """Write ranks.json, ranks.png, allocator.json and (when the exporter is available) the PEFT adapter in
    ``adapter/`` from ``trainer``'s current state, to ``out_dir`` (default: its output_dir).

    Every process must call it (the adapters are gathered); only process 0 writes.
    """
    from adapad_jax.outputs.rank_outputs import plot_ranks, write_allocator_json, write_ranks_json
    from adapad_jax.training import recovery
    from adapad_jax.training.trainer import to_host

    out = Path(out_dir) if out_dir is not None else trainer.output_dir
    recovery.require_finite(trainer.state, trainer.step, "export")
    params, factors = trainer.trained_params(), trainer.committed_peft_factors()
    # A method with a native PEFT form of its own (adalora: AdaLoraConfig) writes it beside adapter/.
    native = getattr(trainer.method_impl, "export_native", None) if trainer.model.exports_to_peft else None
    host = to_host({"trainable": trainer.state["trainable"], "alloc": trainer.state["alloc"],
                    "method": trainer.state.get("method", {})}) if native is not None else None
    if not trainer.writes_files:
        return out
    out.mkdir(parents=True, exist_ok=True)
    ranks = trainer.ranks()
    write_ranks_json(out / "ranks.json", ranks)
    plot_ranks(out / "ranks.png", ranks, title=f"{trainer.method}: committed rank (total {sum(ranks.values())})")
    if trainer.model.exports_to_peft:
        from adapad_jax.models.export import write_peft_adapter

        write_peft_adapter(out / "adapter", trainer.model, params, factors, trainer.scaling,
                           trainer.settings.model_name_or_path)
    if native is not None:
        native(out, trainer.model, params, host, trainer.settings.model_name_or_path)
    write_allocator_json(out / "allocator.json", trainer.scaling, trainer.method, trainer.step,
                         trainer.state["alloc"])
    return out


def reachable_budget(trainer: Any) -> int | None:
    """The most total rank ``trainer``'s run can commit, as the model card states it (the allocator's
    ``rank_capacity`` of the configured budget).
    """
    settings = trainer.settings
    return rank_capacity(settings.rank_budget, len(trainer.model.targets), settings.r_max)


def export_output_set(trainer: Any, output_dir: Path, results: dict | None = None, rows: list | None = None,
                      extra_dir: str | None = None, after_export: Callable[[Path], None] | None = None) -> None:
    """``export_trainer`` plus eval_results.json and predictions.jsonl (when given), staged and swapped in as one set.

    Every process must call it (the export gathers the adapters); only process 0 writes.
    """
    if not is_main_process():
        export_trainer(trainer, None)
        return

    def write(staging: Path) -> None:
        export_trainer(trainer, staging)
        if after_export is not None:
            after_export(staging)
        if results is not None:
            write_json_atomic(staging / EVAL_RESULTS_FILE, results)
        if rows is not None:
            write_jsonl_atomic(staging / PREDICTIONS_FILE, rows)

    names = EXPORTED_OUTPUTS + ((EVAL_RESULTS_FILE,) if results is not None else ()) + (
        (PREDICTIONS_FILE,) if rows is not None else ())
    publish_set(output_dir, names, write, None if extra_dir is None else Path(extra_dir))


# ---------------------------------------------------------------------------------------------- run pieces


def has_checkpoints(output_dir: Path) -> bool:
    """True when ``output_dir/checkpoints`` holds at least one finished orbax step."""
    directory = output_dir / CHECKPOINTS_DIR
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


def resolve_num_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``train.num_steps`` when >= 0, else ``train.num_epochs`` x ``steps_per_epoch``."""
    if config.train.num_steps >= 0:
        return int(config.train.num_steps)
    return int(config.train.num_epochs) * int(steps_per_epoch)


def _model_task(kind: str) -> str:
    return {"classification": "classification", "regression": "regression", "qa": "qa"}[kind]


def model_config_overrides(checked: CheckedRun) -> dict[str, Any]:
    """Fields to set on the checkpoint's config: the task's label names and, when missing, ``pad_token_id``.

    ``id2label`` / ``label2id`` come from the task's class names, as transformers' ``run_glue`` sets them, so an
    exported merged checkpoint's ``pipeline(...)`` shows "not_entailment" rather than "LABEL_1". Qwen3
    checkpoints (e.g. Qwen/Qwen3-0.6B) carry no ``pad_token_id``, which sequence classification needs to find the
    last real token of padded rows; the tokenizer's pad token (eos when it has none) is what pads them.
    """
    overrides = label_maps(checked.task_spec)
    if getattr(checked.hf_config, "pad_token_id", None) is not None:
        return overrides
    from adapad_jax.data import load_tokenizer

    pad_token_id = load_tokenizer(str(checked.checkpoint_dir)).pad_token_id
    return overrides if pad_token_id is None else {**overrides, "pad_token_id": int(pad_token_id)}


def label_maps(spec: Any) -> dict[str, dict]:
    """``id2label`` and ``label2id`` of a classification task with class names; {} otherwise (regression, QA)."""
    if spec.kind != "classification" or not spec.label_names:
        return {}
    return {"id2label": dict(enumerate(spec.label_names)),
            "label2id": {name: i for i, name in enumerate(spec.label_names)}}


def load_model_for(config: ml_collections.ConfigDict, checked: CheckedRun) -> Any:
    """The Flax model for the config's task, with the checkpoint's weights."""
    import jax.numpy as jnp

    from adapad_jax.models.base import ModelOptions
    from adapad_jax.models.registry import load_model

    spec = checked.task_spec
    options = ModelOptions(
        task=_model_task(spec.kind),
        num_labels=spec.num_labels,
        dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32,
        target_names=tuple(config.adapter.target_modules) or None,
        adapter_dropout=float(config.adapter.dropout),
        classifier_dropout=float(config.model.classifier_dropout),
        seed=int(config.seed),
    )
    return load_model(str(checked.checkpoint_dir), options, config_overrides=model_config_overrides(checked))


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
    from adapad_jax.data.batching import num_eval_batches

    process_index, process_count = trainer.batch_slice
    batches = eval_batches(eval_set.features, batch_size, process_index=process_index, process_count=process_count)
    total = num_eval_batches(eval_set.num_features, batch_size)
    desc = f"evaluate {getattr(eval_set, 'split', 'split')}"
    outputs = [trainer.predict(batch) for batch in progress_lib.iterate(batches, total, desc, unit="batches")]
    return concat_eval_outputs(outputs, eval_set.num_features)


def evaluate(trainer: Any, data: Any, batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics over every validation split and the predictions.jsonl rows."""
    from adapad_jax.metrics import evaluate_task

    outputs = {split: predict_split(trainer, eval_set, batch_size) for split, eval_set in data.evals.items()}
    return evaluate_task(data, outputs)


class EvalMemo:
    """``evaluate`` that remembers its newest result, so that the end of a run does not evaluate a step twice."""

    def __init__(self, data: Any, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self._step: int | None = None
        self._result: tuple[dict[str, float], list[dict[str, Any]]] | None = None

    def at(self, trainer: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics and predictions.jsonl rows of the trainer's current state."""
        if self._result is None or self._step != trainer.step:
            self._result = evaluate(trainer, self.data, self.batch_size)
            self._step = trainer.step
        return self._result

    def metrics_of(self, trainer: Any) -> dict[str, float]:
        """Only the metrics (the trainer's ``eval_fn``)."""
        return self.at(trainer)[0]


def select_best_checkpoint(
    trainer: Any, evals: EvalMemo, last: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Restore the evaluated checkpoint with the best main metric (``train.select_best``); eval_results.json content.

    ``last``: the results of the last step (``task``, ``step``, ``metrics``). Without an evaluated checkpoint
    (nothing trained with select_best on) the last step stays.
    """
    key, mode = trainer.checkpointer.best
    best_step = trainer.best_step()
    if best_step is not None and best_step != trainer.step:
        trainer.restore(best_step)
    best_step = trainer.step
    best_metrics = evals.at(trainer)[0]
    if best_step != last["step"]:
        log(f"best {key} {best_metrics.get(key, float('nan')):.4f} at step {best_step} "
            f"(last step {last['step']}: {last['metrics'].get(key, float('nan')):.4f}); exporting step {best_step}")
    return {
        "task": last["task"], "step": best_step, "metrics": best_metrics,
        "main_metric": key, "main_metric_mode": mode, "best_step": best_step, "best_metrics": best_metrics,
        "last_step": last["step"], "last_metrics": last["metrics"],
    }


# ---------------------------------------------------------------------------------------------- entry point


def read_resumes(output_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RESUMES_FILE`` (none when there is no such file; unreadable lines are skipped)."""
    try:
        lines = (Path(output_dir) / RESUMES_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def with_resume_changes(saved: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """``saved`` (a run's config.json) with the changes of every resume recorded in ``output_dir`` applied."""
    for record in read_resumes(output_dir):
        for dotted, change in (record.get("changes") or {}).items():
            *sections, leaf = dotted.split(".")
            node = saved
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = change[1]
    return saved


def recorded_config(output_dir: Path) -> dict[str, Any] | None:
    """The config a run's checkpoints were trained with (config.json + resumes.jsonl); None without a readable one."""
    try:
        saved = json.loads((Path(output_dir) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return with_resume_changes(saved, output_dir) if isinstance(saved, dict) else None


def schedule_replan(config: ml_collections.ConfigDict, recorded: Mapping[str, Any] | None, step: int,
                    num_steps: int, steps_per_epoch: int) -> dict[str, Any] | None:
    """A resume that changes the run's length: the planned and new lengths, and step ``step + 1``'s rate under each."""
    from adapad_jax.training.optim import learning_rate_schedule

    if recorded is None or num_steps <= step:  # nothing left to train under the new plan
        return None
    planned = resolve_num_steps(ml_collections.ConfigDict(recorded), steps_per_epoch)
    if planned == num_steps:
        return None
    optim = config.optim

    def rate(total: int) -> float:
        return float(learning_rate_schedule(optim.learning_rate, optim.warmup_steps, total, optim.schedule)(step))

    return {"planned_steps": planned, "num_steps": num_steps, "step": step + 1, "rate_before": rate(planned),
            "rate_after": rate(num_steps)}


def record_resume(output_dir: Path, step: int, changes: Mapping[str, tuple[Any, Any]],
                  replan: Mapping[str, Any] | None) -> None:
    """Append this resume (its step, the fields it changed, a re-planned schedule) to ``RESUMES_FILE``."""
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "from_step": int(step),
        "changes": {dotted: [old, new] for dotted, (old, new) in changes.items()},
    }
    if replan is not None:
        record["schedule"] = dict(replan)
    write_jsonl_atomic(output_dir / RESUMES_FILE, read_resumes(output_dir) + [record])


def check(config: ml_collections.ConfigDict) -> CheckedRun:
    """All up-front checks against this process's devices and the output directory's previous run."""
    import jax

    check_output_dir_path(Path(config.output_dir))
    devices = jax.devices()
    checked = validate_config(config, num_devices=len(devices), platform=devices[0].platform)
    check_processes_use_all_devices(config, len(devices), jax.process_count())
    output_dir = Path(config.output_dir)
    check_output_dir_is_directory(output_dir)
    refuse_if_held(output_dir)  # before loading anything; the lock itself is taken before the first write
    recorded = recorded_config(output_dir) if has_checkpoints(output_dir) else None
    if recorded is not None:
        same_backbone = check_backbone(output_dir, checked.checkpoint_dir, config.model.name_or_path)
        checked.resume_changes = check_resume(config, recorded, same_backbone)
    return checked


def run(
    config: ml_collections.ConfigDict,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_trainer: bool = False,
) -> RunResult:
    """Validate, then train (resuming from ``output_dir`` when it has checkpoints), evaluate and export.

    ``progress``: a tqdm bar on a terminal, else a line per logged step / evaluation through ``log``
    (see ``adapad_jax.runtime.progress``); False prints no progress.
    """
    with progress_lib.reporting(progress_lib.Reporter(progress_lib.choose_mode(progress), log)):
        return _run(config, progress=progress, log=log, keep_trainer=keep_trainer)


def _run(
    config: ml_collections.ConfigDict,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_trainer: bool = False,
) -> RunResult:
    """``run`` inside its progress reporter."""
    check_fields(config)  # cheap field checks first, before a registered task (the demo) builds anything
    hooks = hooks_for(config.task)
    if hooks is not None:
        hooks.prepare_config(config, log=log)
    absolute_local_paths(config)  # config.json, the adapter and the model card name them from any directory
    checked = check(config)
    recorded = recorded_config(Path(config.output_dir)) if has_checkpoints(Path(config.output_dir)) else None
    enable_persistent_cache(config.compilation_cache_dir)  # before this run's first compile
    main_process = is_main_process()
    if not main_process:
        progress, log = False, _ignore
        progress_lib.silence()
    if progress_lib.current().mode != "bar":  # no bars: tqdm's carriage returns would garble a log file
        import datasets

        datasets.disable_progress_bars()

    from adapad_jax.data import TrainBatches
    from adapad_jax.training import Trainer, make_mesh
    from adapad_jax.training.sharding import process_batch_slice

    model = load_model_for(config, checked)
    want_train = config.train.num_steps != 0
    data = load_data_for(config, checked, model, include_train=want_train)
    check_loaded_data(data, want_train)
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.components),
                     int(config.adapter.r_max) if has_slot_axis(config.adapter.method) else None)
    batches = None
    if want_train:  # before output_dir is touched: too few rows for one batch is bad input
        process_index, process_count = process_batch_slice(mesh)
        batches = TrainBatches(
            data.train, int(config.train.batch_size), int(config.seed),
            process_index=process_index, process_count=process_count,
        )

    output_dir = Path(config.output_dir)
    completed = False
    lock = take_output_dir(output_dir, checked, log)
    try:
        if main_process and recorded is None:  # a resume keeps config.json and records its changes (record_resume)
            write_text_atomic(output_dir / CONFIG_FILE, config.to_json(indent=2) + "\n")
            (output_dir / RESUMES_FILE).unlink(missing_ok=True)  # a previous run's, whose checkpoints are gone
        if main_process:
            write_backbone_fingerprint(output_dir, checked.checkpoint_dir)
        trainer = Trainer(model, config, mesh, output_dir)
    except OSError as err:
        _release(lock)
        raise OutputWriteError(describe_os_error(err, output_dir)) from None
    except BaseException:
        _release(lock)
        raise
    try:
        trainer.metrics.start()  # W&B starts (or stops the run with one line) before any compile or step
        data_state = trainer.restore_or_init(batches.state_dict() if batches is not None else {})
        if batches is not None and data_state:
            batches.load_state_dict(data_state)
        steps_per_epoch = batches.steps_per_epoch if batches is not None else 0
        num_steps = resolve_num_steps(config, steps_per_epoch)
        if recorded is not None:
            announce_resume(output_dir, trainer.step, checked.resume_changes,
                            schedule_replan(config, recorded, trainer.step, num_steps, steps_per_epoch), log)
        elif trainer.step:  # checkpoints beside an unreadable config.json (rewritten above)
            log(f"resuming {output_dir} from step {trainer.step}")
        eval_batch = int(config.train.eval_batch_size)
        evals = EvalMemo(data, eval_batch)
        if num_steps > 0 and trainer.step < num_steps:
            log(f"training {config.adapter.method} for {num_steps} steps ({len(model.targets)} adapted modules)")
            if trainer.budget_conversion is not None:
                log(param_budget_line(trainer.budget_conversion))
            log(rank_schedule_line(trainer.rank_schedule(num_steps), config))
            release_free_heap()  # set-up's freed host memory; the steps' own stays mapped (host_malloc)
            trainer.train(
                batches,
                num_steps,
                data_state_fn=batches.state_dict,
                eval_fn=evals.metrics_of,
                eval_every=int(config.train.eval_every_steps),
                progress=progress,
            )
        metrics, rows = evals.at(trainer)
        step = trainer.step
        trainer.metrics.write({"step": step, "eval": metrics, "final": True})
        results = {"task": config.task, "step": step, "metrics": metrics}
        if trainer.select_best:
            results = select_best_checkpoint(trainer, evals, results, log)
            step = trainer.step
            metrics, rows = evals.at(trainer)
        results["rank"] = trainer.rank_schedule(num_steps)
        accounting = trainer.accounting()  # of the exported step
        results["adapter_parameters"] = accounting
        trainer.metrics.write({"step": step, "adapter_parameters": accounting})

        def write_card(staging: Path) -> None:
            from adapad_jax.outputs.model_card import write_model_card

            if (staging / "adapter").is_dir():
                write_model_card(staging / "adapter", config, metrics, step, model.hf_config.model_type,
                                 base_dir=checked.checkpoint_dir, accounting=accounting,
                                 reachable_budget=reachable_budget(trainer))

        export_output_set(trainer, output_dir, results, rows, after_export=write_card)
        trainer.metrics.write_image("ranks", output_dir / "ranks.png", step)
        ranks = trainer.ranks()
        log(accounting_line(config.adapter.method, accounting))
        log(
            f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            + f"; total rank {sum(ranks.values())} over {len(ranks)} modules; outputs in {output_dir}"
        )
        result = RunResult(output_dir, metrics, ranks, step, num_steps)
        if keep_trainer:
            result.trainer, result.data = trainer, data
        completed = True
        return result
    finally:
        finish_run(None if keep_trainer else trainer, lock, output_dir, failed=not completed)


def announce_resume(output_dir: Path, step: int, changes: Mapping[str, tuple[Any, Any]],
                    replan: Mapping[str, Any] | None, log: Callable[[str], None]) -> None:
    """Say that the run resumes (with the fields it changes and a re-planned schedule) and record it."""
    shown = {k: v for k, v in changes.items() if k != "compilation_cache_dir"}
    line = f"resuming {output_dir} from step {step}"
    if shown:
        line += " with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in shown.items())
    log(line + f" (recorded in {RESUMES_FILE}; config.json keeps the run's first config)")
    if replan is not None:
        log(f"learning-rate schedule re-planned for {replan['num_steps']} steps (it was planned for "
            f"{replan['planned_steps']}; train.extend_schedule=True): the rate of step {replan['step']} goes from "
            f"{replan['rate_before']:.2e} to {replan['rate_after']:.2e}")
    if is_main_process():
        record_resume(output_dir, step, changes, replan)


def take_output_dir(output_dir: Path, checked: CheckedRun, log: Callable[[str], None]) -> Any:
    """Create ``output_dir`` and take its run lock (process 0); OS errors become one line."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        return acquire_for_all_processes(output_dir)
    except OSError as err:
        raise OutputWriteError(describe_os_error(err, output_dir)) from None


def finish_run(trainer: Any, lock: Any, output_dir: Path, failed: bool) -> None:
    """Close ``trainer`` (when given) and release the lock on every path. When the run is already failing, an error
    while closing (a TensorBoard flush onto the same full disk) is dropped: the first failure is the one reported."""
    try:
        if trainer is not None:
            try:
                trainer.close()
            except Exception as err:  # noqa: BLE001 - a sink wraps the OS error in its own type
                if failed:
                    return
                os_err = os_error_in_chain(err)
                if os_err is None:
                    raise
                raise OutputWriteError(f"the run's logs not written: {describe_os_error(os_err, output_dir)}") from None
    finally:
        _release(lock)


def _release(lock: Any) -> None:
    if lock is not None:
        lock.release()


def rank_schedule_line(schedule: Mapping[str, Any], config: ml_collections.ConfigDict) -> str:
    """The start-of-run line on the total rank the growth schedule can reach against the budget."""
    adapter = config.adapter
    line = (f"rank schedule: growth can reach total rank {schedule['reachable_total_rank']} of the budget "
            f"{schedule['rank_budget']}")
    if has_slot_axis(adapter.method) and schedule["reachable_total_rank"] < schedule["rank_budget"]:
        line += (f" (initial ranks + (floor(steps / T) - 1) x top_k with T={adapter.growth_interval}, "
                 f"top_k={adapter.top_k}; more steps, a smaller T or a larger top_k would spend the rest)")
    return line


def param_budget_line(conversion: Mapping[str, Any]) -> str:
    """The start-of-run line on what ``adapter.param_budget`` became (``Trainer.budget_conversion``)."""
    return (f"budget: adapter.param_budget={conversion['param_budget']} -> {conversion['field']}="
            f"{conversion['value']} ({conversion['modules']} modules, mean in + out {conversion['mean_width']:g})")


def accounting_line(method: str, counts: Mapping[str, Any]) -> str:
    """The end-of-run line on the adapter's parameters (``Trainer.accounting``)."""
    return (f"adapter parameters: factors {counts['factors']:,}, with extras {counts['with_extras']:,}, with "
            f"reserves {counts['with_reserves']:,}; head {counts['head']:,}; {method}'s paper count "
            f"{counts['paper']:,} ({counts['paper_count']})")


def _ignore(_: str) -> None:
    """A ``log`` that drops its message (processes other than 0)."""


