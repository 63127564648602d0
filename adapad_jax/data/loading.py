"""Raw GLUE / SQuAD splits from the Hugging Face hub cache, tensorflow-datasets, or local files.

Local files are in the dataset's own schema (see ``TaskSpec.required_columns``): ``.jsonl`` / ``.json``
(JSON lines, a JSON array of rows, or for SQuAD the official nested ``{"data": [...]}`` file), ``.csv``
(SQuAD ``answers`` as a JSON string), ``.tsv`` (tab-separated with a header row, read as GLUE's own files are:
no quoting, so a quote character inside a sentence is text) or ``.parquet``. ``validation_file`` may list several
files separated by commas, one per validation split of the task in order (MNLI: matched, then mismatched).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from adapad_jax.data.tasks import DataError, TaskSpec, get_task

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_MAX_ERROR_ROWS = 3
# data.source=tfds existed until TFDS turned out to need TensorFlow (as_dataset) or a local array_record build
# that its GLUE/SQuAD builders cannot make offline; the same data comes from the hub or from local files.
TFDS_REMOVED = (
    "data.source=tfds is not supported (TFDS needs TensorFlow to read GLUE/SQuAD): use data.source=hub "
    "(Hugging Face datasets, cached after the first download) or local files with data.train_file / "
    "data.validation_file (jsonl, json, csv, tsv or parquet; a TFDS split can be written out with tfds.as_dataframe)"
)


def _as_spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def split_validation_files(task: str | TaskSpec, validation_file: str) -> dict[str, str]:
    """Map the task's validation split names to the comma-separated files of ``validation_file``."""
    spec = _as_spec(task)
    files = [f.strip() for f in validation_file.split(",") if f.strip()]
    if len(files) > len(spec.validation_splits):
        raise DataError(
            f"data.validation_file lists {len(files)} files but task {spec.name} has "
            f"{len(spec.validation_splits)} validation split(s): {', '.join(spec.validation_splits)}"
        )
    return dict(zip(spec.validation_splits, files))


# ----------------------------------------------------------------------------------------------------------
# Cheap up-front validation of local files.


def _file_format(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data file '{path}' has an unsupported extension (use one of: {', '.join(_FORMATS)})")
    return fmt


def _is_official_squad(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("data"), list) and all(
        isinstance(article, dict) and "paragraphs" in article for article in obj["data"][:1]
    )


def _flatten_official_squad(articles: list[dict]) -> list[dict]:
    """Official SQuAD nesting (articles > paragraphs > qas) -> one row per question in the HF schema."""
    rows = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers", [])
                rows.append(
                    {
                        "id": qa.get("id"),
                        "title": article.get("title", ""),
                        "context": paragraph.get("context"),
                        "question": qa.get("question"),
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a["answer_start"] for a in answers],
                        },
                    }
                )
    return rows


def _read_json_rows(path: Path) -> tuple[list[dict], bool]:
    """Parse a .json/.jsonl file; returns its rows and whether it was the official nested SQuAD format."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data file '{path}' is not UTF-8 text: {err}") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"data file '{path}' is empty")
    if stripped[0] == "[" or (stripped[0] == "{" and path.suffix.lower() == ".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # maybe JSON lines with a .json extension
        if isinstance(whole, list):
            return whole, False
        if _is_official_squad(whole):
            return _flatten_official_squad(whole["data"]), True
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"data file '{path}' is not valid JSON lines: line {line_number}: {err.msg}") from None
    return rows, False


def _read_csv_rows(path: Path) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"data file '{path}' is not valid CSV: {err}") from None


def read_tsv_rows(path: Path) -> list[dict]:
    """Rows of a tab-separated file with a header, without quote handling (GLUE's TSVs have bare quotes)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"data file '{path}' is not valid TSV: {err}") from None


def label_key(value: Any) -> str:
    """A label as a class name: text as it is (stripped), a whole number as its digits (1, 1.0 and "1" alike)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _label_value(spec: TaskSpec, value: Any) -> int | float:
    """A label as the task needs it (class id or float score); raises ValueError saying why it is unusable.

    Classification labels match a class name first (``label_key``), else are taken as a class id, unless the
    names are themselves whole numbers (task=custom labels 1, 2, 10): then 0 is no class rather than the first.
    """
    if spec.kind == "classification" and label_key(value) in spec.label_names:
        return spec.label_names.index(label_key(value))
    if spec.kind == "classification" and spec.label_names and all(n.lstrip("-").isdigit() for n in spec.label_names):
        raise ValueError(f"label {value!r} is not one of the classes {list(spec.label_names)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        names = f" or one of {list(spec.label_names)}" if spec.label_names else ""
        raise ValueError(f"label {value!r} is not a number{names}") from None
    if spec.kind == "regression":
        return number
    if number != int(number):
        raise ValueError(f"label {value!r} is not a class id")
    if not 0 <= number < spec.num_labels:
        raise ValueError(f"label {int(number)} is outside 0..{spec.num_labels - 1}")
    return int(number)


def _check_label(spec: TaskSpec, value: Any) -> str | None:
    """Why a label value is unusable for the task, or None when it is fine."""
    try:
        _label_value(spec, value)
    except ValueError as err:
        return str(err)
    return None


def _check_answers(value: Any) -> str | None:
    """Why a SQuAD ``answers`` value is malformed, or None when it is fine."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return "answers is a string that is not JSON"
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        return "answers must be {'text': [...], 'answer_start': [...]}"
    if len(value["text"]) != len(value["answer_start"]):
        return "answers.text and answers.answer_start differ in length"
    return None


def _check_rows(spec: TaskSpec, path: Path, rows: Iterable[dict], columns_only: bool = False) -> int:
    """Check every row has the task's columns (and well-formed labels / answers); returns the row count."""
    count = 0
    problems: list[str] = []
    for number, row in enumerate(rows, start=1):
        count += 1
        if not isinstance(row, dict):
            raise DataError(f"data file '{path}': row {number} is not an object with named columns")
        missing = [c for c in spec.required_columns if c not in row]
        if missing:
            raise DataError(
                f"data file '{path}' lacks column(s) {', '.join(missing)} needed by task {spec.name} "
                f"(row {number}; required: {', '.join(spec.required_columns)})"
            )
        if columns_only:
            continue
        if spec.kind == "qa":
            problem = _check_answers(row["answers"])
        else:
            problem = _check_label(spec, row[spec.label_column])
            for column in spec.text_columns:
                if not isinstance(row[column], str):
                    problem = problem or f"column '{column}' is {row[column]!r}, not text"
        if problem and len(problems) < _MAX_ERROR_ROWS:
            problems.append(f"row {number}: {problem}")
    if problems:
        raise DataError(f"data file '{path}' has bad values for task {spec.name}: {'; '.join(problems)}")
    if count == 0:
        raise DataError(f"data file '{path}' has no rows")
    return count


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"data file '{path}' is not a valid parquet file: {err}") from None


def read_file_rows(path: str | Path) -> list[dict]:
    """Every row of a local data file (json / jsonl incl. official SQuAD, csv, tsv, parquet) as a dict."""
    file_path = Path(path)
    if not file_path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    fmt = _file_format(file_path)
    if fmt == "json":
        return _read_json_rows(file_path)[0]
    if fmt == "csv":
        return _read_csv_rows(file_path)
    if fmt == "tsv":
        return read_tsv_rows(file_path)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file_path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"data file '{path}' is not a valid parquet file: {err}") from None


def validate_data_file(task: str | TaskSpec, path: str) -> int:
    """Check one local data file exists, parses and has the task's columns; returns its row count (-1 for parquet)."""
    spec = _as_spec(task)
    file_path = Path(path)
    if not file_path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    fmt = _file_format(file_path)
    if fmt == "json":
        rows, _ = _read_json_rows(file_path)
        return _check_rows(spec, file_path, rows)
    if fmt == "csv":
        return _check_rows(spec, file_path, _read_csv_rows(file_path))
    if fmt == "tsv":
        return _check_rows(spec, file_path, read_tsv_rows(file_path))
    columns = _parquet_columns(file_path)
    _check_rows(spec, file_path, [dict.fromkeys(columns)], columns_only=True)
    return -1


def validate_data_files(task: str | TaskSpec, train_file: str = "", validation_file: str = "") -> None:
    """Validate the local files a run was given, before any compute; raises DataError naming the problem."""
    spec = _as_spec(task)
    if train_file:
        validate_data_file(spec, train_file)
    if validation_file:
        for path in split_validation_files(spec, validation_file).values():
            validate_data_file(spec, path)


# ----------------------------------------------------------------------------------------------------------
# Loading.


def _load_local(spec: TaskSpec, path: str):
    """One local file -> datasets.Dataset through datasets.load_dataset(json/csv/parquet)."""
    import datasets

    validate_data_file(spec, path)
    file_path = Path(path)
    fmt = _file_format(file_path)
    if fmt == "json":
        rows, official = _read_json_rows(file_path)
        if official:
            # The nested official format has no flat rows for the json builder; it was validated and parsed above.
            return datasets.Dataset.from_list(rows)
        del rows
    if fmt == "tsv":  # datasets' csv builder (pandas) would treat quotes as quoting and "NA" as missing
        return datasets.Dataset.from_list(read_tsv_rows(file_path))
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(fmt, data_files={"rows": str(file_path)}, split="rows")
    except Exception as err:  # noqa: BLE001 - datasets wraps parser errors in several types
        raise DataError(f"data file '{path}' could not be read as {fmt}: {str(err).splitlines()[0]}") from None
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    _check_rows(spec, file_path, [dict.fromkeys(dataset.column_names)], columns_only=True)
    return dataset


def _load_hub(spec: TaskSpec, split: str):
    import datasets

    if not spec.hub_names:
        raise DataError(f"task {spec.name} has no hub dataset: give data.train_file / data.validation_file")
    errors = []
    for path, config in spec.hub_names:
        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as err:  # noqa: BLE001 - offline / missing cache raise several types
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            errors.append(f"{path}{'/' + config if config else ''}: {reason}")
    tried = " or ".join(f"'{p}'" + (f" (config '{c}')" if c else "") for p, c in spec.hub_names)
    raise DataError(
        f"cannot load split '{split}' of {tried} from the Hugging Face hub or its local cache "
        f"({errors[0]}); when offline, give local files in the dataset's schema with "
        f"data.train_file=... and data.validation_file=... (jsonl, json, csv, tsv or parquet; columns: "
        f"{', '.join(spec.required_columns)}))"
    )


def _normalise(spec: TaskSpec, dataset, origin: str):
    """Fill optional columns, map label names to ids, parse CSV answers, check and cast labels."""
    if spec.kind == "qa":
        if "title" not in dataset.column_names:
            dataset = dataset.add_column("title", [""] * len(dataset))
        if getattr(dataset.features["answers"], "dtype", None) in ("string", "large_string"):  # CSV: JSON text
            dataset = dataset.map(lambda row: {"answers": json.loads(row["answers"])})
        return dataset
    if spec.id_column not in dataset.column_names:
        dataset = dataset.add_column(spec.id_column, list(range(len(dataset))))
    try:
        labels = [_label_value(spec, v) for v in dataset[spec.label_column]]
    except ValueError as err:
        raise DataError(f"{origin} has bad labels for task {spec.name}: {err}") from None
    import datasets

    dataset = dataset.remove_columns(spec.label_column).add_column(spec.label_column, labels)
    return dataset.cast_column(
        spec.label_column, datasets.Value("float32" if spec.kind == "regression" else "int64")
    )


def load_raw_splits(
    task: str | TaskSpec,
    *,
    source: str = "auto",
    train_file: str = "",
    validation_file: str = "",
    max_train_examples: int = 0,
    max_eval_examples: int = 0,
    include_train: bool = True,
) -> dict[str, Any]:
    """Raw ``datasets.Dataset`` per split: ``"train"`` and the task's validation split names.

    ``source``: "auto" (local files when given, else the hub), "hub" or "local". With local files,
    a split without a file is left out (a run with only a validation file can evaluate).
    """
    spec = _as_spec(task)
    if source == "tfds":
        raise DataError(TFDS_REMOVED)
    if source not in ("auto", "hub", "local"):
        raise DataError(f"data.source must be one of auto, hub, local (got '{source}')")
    use_local = source == "local" or (source == "auto" and (train_file or validation_file))
    if use_local and not (train_file or validation_file):
        raise DataError("data.source=local needs data.train_file and/or data.validation_file")
    if source == "hub" and (train_file or validation_file):
        raise DataError(f"data.source={source} cannot be combined with data.train_file / data.validation_file")

    wanted: dict[str, str] = {}  # split name -> local path ("" = remote)
    if use_local:
        if include_train and train_file:
            wanted["train"] = train_file
        wanted.update(split_validation_files(spec, validation_file) if validation_file else {})
    else:
        if include_train:
            wanted["train"] = ""
        wanted.update(dict.fromkeys(spec.validation_splits, ""))

    splits = {}
    for split, path in wanted.items():
        if path:
            dataset, origin = _load_local(spec, path), f"data file '{path}'"
        else:
            dataset, origin = _load_hub(spec, split), f"hub dataset {spec.hub_names[0][0]}[{split}]"
        dataset = _normalise(spec, dataset, origin)
        limit = max_train_examples if split == "train" else max_eval_examples
        if limit and limit > 0 and len(dataset) > limit:
            dataset = dataset.select(range(limit))
        splits[split] = dataset
    return splits

