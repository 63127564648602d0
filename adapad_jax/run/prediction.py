"""Predictions of a trained run on new data (labelled or not), in the formats the benchmarks' servers take.

GLUE: one submission TSV per split, named and formatted as gluebenchmark.com expects (``index`` and
``prediction`` columns; label names for MNLI / QNLI / RTE, 0/1 for CoLA / SST-2 / MRPC / QQP, a score for
STS-B); task=custom gets ``predictions.tsv`` in the same layout with its class names. SQuAD: the official
``predictions.json`` ({id: answer}) and, for v2, ``na_probs.json`` ({id: no-answer probability}) that the
official evaluation script reads. All also get ``predictions.jsonl`` (the run's own row format) and, when the
file has labels / answers, ``metrics.json``. The run directory is only read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from adapad_jax.config.schema import ConfigError
from adapad_jax.data.tasks import DataError, TaskSpec

# GLUE submission file name per (task, split), as the GLUE server expects them in the zip.
GLUE_SUBMISSION_FILES = {
    ("glue_cola", "validation"): "CoLA.tsv",
    ("glue_sst2", "validation"): "SST-2.tsv",
    ("glue_mrpc", "validation"): "MRPC.tsv",
    ("glue_qqp", "validation"): "QQP.tsv",
    ("glue_stsb", "validation"): "STS-B.tsv",
    ("glue_mnli", "validation_matched"): "MNLI-m.tsv",
    ("glue_mnli", "validation_mismatched"): "MNLI-mm.tsv",
    ("glue_qnli", "validation"): "QNLI.tsv",
    ("glue_rte", "validation"): "RTE.tsv",
}
# Tasks whose GLUE submissions use label names (the others use class ids or, for STS-B, a score).
GLUE_NAMED_LABELS = ("glue_mnli", "glue_qnli", "glue_rte")
# task=custom: the same two columns, the prediction as the class name (or the score).
CUSTOM_PREDICTIONS_FILE = "predictions.tsv"
_READABLE = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pq")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json (incl. official SQuAD)/.csv/.tsv/.parquet file."""
    from adapad_jax.data.loading import read_file_rows

    if path.suffix.lower() not in _READABLE:
        raise DataError(f"test file '{path}' has an unsupported extension (use one of: {', '.join(_READABLE)})")
    if not path.is_file():
        raise DataError(f"test file '{path}' does not exist")
    return read_file_rows(path)


def _unlabelled(value: Any) -> bool:
    return value is None or value == "" or str(value).strip() in ("-1", "-1.0")


def _has_answer(answers: Any) -> bool:
    if isinstance(answers, str):
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError:
            return False
    return isinstance(answers, dict) and bool(answers.get("text"))


def normalise_test_rows(spec: TaskSpec, path: Path, rows: list[dict[str, Any]]) -> tuple[list[dict], bool]:
    """Rows in the run's data schema (dummy labels where there are none) and whether the file has labels.

    GLUE: the task's text columns, an optional ``idx`` (or ``index``, as in GLUE's test TSVs) and an optional
    label (missing, empty or -1 = unlabelled, as in the hub's test splits). SQuAD: ``id``, ``context``,
    ``question`` and optional ``answers`` (labelled when some question has an answer).
    """
    from adapad_jax.data.loading import _check_answers, _label_value

    if not rows:
        raise DataError(f"test file '{path}' has no rows")
    needed = ("id", "context", "question") if spec.kind == "qa" else spec.text_columns
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"test file '{path}': row {number} is not an object with named columns")
        missing = [c for c in needed if c not in row]
        if missing:
            raise DataError(
                f"test file '{path}' lacks column(s) {', '.join(missing)} needed by task {spec.name} "
                f"(row {number}; required: {', '.join(needed)})"
            )
    out: list[dict[str, Any]] = []
    if spec.kind == "qa":
        # Official SQuAD files without answers flatten to empty answer lists: count a file as labelled only when
        # some question has an answer.
        labelled = all("answers" in row for row in rows) and any(_has_answer(row["answers"]) for row in rows)
        for number, row in enumerate(rows, start=1):
            answers = row.get("answers") if labelled else {"text": [], "answer_start": []}
            problem = _check_answers(answers) if labelled else None
            if problem:
                raise DataError(f"test file '{path}': row {number}: {problem}")
            out.append({"id": str(row["id"]), "title": row.get("title", ""), "context": row["context"],
                        "question": row["question"], "answers": answers})
        return out, labelled
    label = spec.label_column
    labelled = all(label in row and not _unlabelled(row[label]) for row in rows)
    for number, row in enumerate(rows, start=1):
        idx = row.get("idx", row.get("index", number - 1))
        try:
            idx = int(idx)
        except (TypeError, ValueError):
            raise DataError(f"test file '{path}': row {number}: index {idx!r} is not an integer") from None
        value: Any = 0.0 if spec.kind == "regression" else 0
        if labelled:
            try:
                value = _label_value(spec, row[label])
            except ValueError as err:
                raise DataError(f"test file '{path}': row {number}: {err}") from None
        out.append({**{c: row[c] for c in spec.text_columns}, "idx": idx, label: value})
    return out, labelled


def glue_submission_lines(spec: TaskSpec, rows: list[dict[str, Any]]) -> list[str]:
    """The lines of a GLUE submission TSV from predictions.jsonl rows (``idx``, ``label``)."""
    lines = ["index\tprediction"]
    for row in rows:
        if spec.kind == "regression":
            value = f"{float(row['label']):.6f}"
        elif spec.name in GLUE_NAMED_LABELS or not spec.is_glue:  # task=custom: its class names
            value = spec.label_names[int(row["label"])]
        else:
            value = str(int(row["label"]))
        lines.append(f"{int(row['idx'])}\t{value}")
    return lines


def predict(
    run_dir: str | os.PathLike, test_file: str, *, step: int | None = None, out_dir: str | None = None,
    eval_batch_size: int = 0, log: Callable[[str], None] = print,
) -> Path:
    """Restore a run's checkpoint and write predictions (and metrics, with labels) for ``test_file`` into ``out_dir``.

    ``step`` None: the step the run exported (``saved_run.default_step``); the first line logged names it and why.

    ``test_file``: one file, or for MNLI "matched,mismatched". ``out_dir`` defaults to
    ``<run_dir>/predict-step<N>``; it must not be the run directory itself.
    """
    from adapad_jax.config.validation import task_spec_for
    from adapad_jax.data.loading import split_validation_files
    from adapad_jax.runtime.failures import OutputWriteError, describe_os_error
    from adapad_jax.outputs.output_set import publish_set, write_json_atomic, write_jsonl_atomic, write_text_atomic
    from adapad_jax.run.saved_run import load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)  # raises ConfigError for a directory that is not a run
    spec = task_spec_for(config)
    if not (spec.is_glue or spec.kind == "qa" or config.task == "custom"):
        raise ConfigError(f"'{run_dir}' is a {spec.name} run: predictions are for GLUE and SQuAD runs "
                          "(and task=custom)")
    if not str(test_file).strip():
        raise ConfigError("no test file given: pass --config.data.test_file=<file> (jsonl, json, csv, tsv, parquet)")
    files = split_validation_files(spec, test_file)
    normalised = {}
    for split, path in files.items():
        normalised[split] = normalise_test_rows(spec, Path(path), _read_rows(Path(path)))
    if out_dir is not None and Path(out_dir).resolve() == run_dir.resolve():
        raise ConfigError(f"--out '{out_dir}' is the run directory: predictions go into a directory of their own")
    if out_dir is not None:
        from adapad_jax.config.validation import check_output_dir_path

        check_output_dir_path(Path(out_dir), "--out")

    import datasets

    from adapad_jax.data import build_task_data, load_tokenizer
    from adapad_jax.metrics.evaluate import evaluate_split, predictions_from_outputs
    from adapad_jax.runtime.distributed import is_main_process
    from adapad_jax.run.core import predict_split
    from adapad_jax.run.saved_run import restored_run

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as scratch, restored_run(run_dir, step, log) as restored:
        step = restored.step
        out = Path(out_dir) if out_dir else run_dir / f"predict-step{step}"
        paths = []
        for split, (rows, _) in normalised.items():
            path = Path(scratch) / f"{split}.jsonl"
            write_jsonl_atomic(path, rows)
            paths.append(str(path))
        data = build_task_data(
            spec, load_tokenizer(str(restored.checked.checkpoint_dir)), source="local",
            validation_file=",".join(paths), max_length=int(config.data.max_length or 0),
            doc_stride=int(config.data.doc_stride), with_token_type_ids=bool(restored.model.uses_token_type_ids),
            include_train=False, cache_dir=None,
        )
        batch = int(eval_batch_size or config.train.eval_batch_size)
        metrics: dict[str, float] = {}
        all_rows: list[dict[str, Any]] = []
        written: dict[str, Any] = {}
        for split, eval_set in data.evals.items():
            outputs = predict_split(restored.trainer, eval_set, batch)
            if normalised[split][1]:
                split_metrics, rows = evaluate_split(spec, eval_set, outputs)
                metrics.update(split_metrics)
            else:
                _, _, rows = predictions_from_outputs(spec, eval_set, outputs)
            all_rows.extend(rows)
            if spec.kind == "qa":
                written["predictions.json"] = {r["id"]: r["prediction_text"] for r in rows}
                if spec.version_2:
                    written["na_probs.json"] = {r["id"]: float(r["no_answer_probability"]) for r in rows}
            else:
                name = GLUE_SUBMISSION_FILES.get((spec.name, split), CUSTOM_PREDICTIONS_FILE)
                written[name] = "\n".join(glue_submission_lines(spec, rows)) + "\n"
        if not is_main_process():
            return out
        if metrics:
            written["metrics.json"] = {"task": spec.name, "step": step, "test_file": test_file, "metrics": metrics}

        def write(staging: Path) -> None:
            for name, content in written.items():
                if isinstance(content, str):
                    write_text_atomic(staging / name, content)
                else:
                    write_json_atomic(staging / name, content)
            write_jsonl_atomic(staging / "predictions.jsonl", all_rows)

        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputWriteError(describe_os_error(err, out)) from None
        publish_set(out, [*written, "predictions.jsonl"], write)  # the files describe one step, or none is replaced
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    log(f"predicted {len(all_rows)} rows with step {step} of {run_dir} into {out}"
        + (f"; {summary}" if summary else " (no labels: no metrics)"))
    return out
