"""Local-file loading (jsonl, json, csv, parquet, official SQuAD), validation errors, hub failures, no tfds."""

import csv
import re
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapad_jax.data import DataError, get_task, load_raw_splits, validate_data_files
from adapad_jax.testing.tiny import write_tiny_glue, write_tiny_squad


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: json.dumps(row[c]) if isinstance(row[c], dict) else row[c] for c in columns})
    return str(path)


def _same_rows(dataset, rows, columns):
    assert len(dataset) == len(rows)
    for loaded, expected in zip(dataset, rows):
        for column in columns:
            assert loaded[column] == expected[column], column


@pytest.fixture(scope="module")
def mrpc(tmp_path_factory):
    return write_tiny_glue(tmp_path_factory.mktemp("mrpc"), "mrpc", n_train=12, n_val=6)


def test_task_registry():
    assert get_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("glue_stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("squad_v2").version_2
    assert get_task("squad").required_columns == ("id", "context", "question", "answers")
    with pytest.raises(DataError, match="unknown task 'glue_foo'"):
        get_task("glue_foo")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_glue_local_files_in_every_format(mrpc, tmp_path, fmt):
    rows = _read_jsonl(mrpc.train_file)
    columns = ["sentence1", "sentence2", "label", "idx"]
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        path = mrpc.train_file
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        _write_csv(path, rows, columns)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    splits = load_raw_splits("glue_mrpc", train_file=str(path), validation_file=mrpc.validation_file)
    assert set(splits) == {"train", "validation"}
    _same_rows(splits["train"], rows, columns)
    _same_rows(splits["validation"], _read_jsonl(mrpc.validation_file), columns)


def test_glue_tsv_files_train_as_glue_ships_them(mrpc, tmp_path):
    # GLUE's own TSVs: a header, tabs, and quote characters that are text (no CSV quoting), e.g. a sentence that
    # starts with a quote; "NA" is a word, not a missing value.
    rows = _read_jsonl(mrpc.train_file)
    rows[0] = dict(rows[0], sentence1='"Yes," she said, "it\'s 5" tall."', sentence2="NA")
    path = tmp_path / "train.tsv"
    path.write_text("sentence1\tsentence2\tlabel\n" + "".join(
        f"{r['sentence1']}\t{r['sentence2']}\t{r['label']}\n" for r in rows))
    validate_data_files("glue_mrpc", str(path), mrpc.validation_file)
    splits = load_raw_splits("glue_mrpc", train_file=str(path), validation_file=mrpc.validation_file)
    _same_rows(splits["train"], rows, ["sentence1", "sentence2", "label"])
    assert splits["train"]["idx"] == list(range(len(rows)))


def test_squad_local_files_jsonl_parquet_csv_and_official_nested_json(tmp_path):
    files = write_tiny_squad(tmp_path, version=2, n_train=10, n_val=4)
    rows = _read_jsonl(files.train_file)
    columns = ["id", "title", "context", "question", "answers"]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    csv_path = _write_csv(tmp_path / "train.csv", rows, columns)
    def qa(row):
        pairs = zip(row["answers"]["text"], row["answers"]["answer_start"])
        return {"id": row["id"], "question": row["question"], "is_impossible": not row["answers"]["text"],
                "answers": [{"text": t, "answer_start": s} for t, s in pairs]}

    official = {"version": "v2.0", "data": [
        {"title": row["title"], "paragraphs": [{"context": row["context"], "qas": [qa(row)]}]} for row in rows]}
    official_path = tmp_path / "train-v2.0.json"
    official_path.write_text(json.dumps(official))
    for path in (files.train_file, parquet, csv_path, official_path):
        splits = load_raw_splits("squad_v2", train_file=str(path))
        assert list(splits) == ["train"]
        _same_rows(splits["train"], rows, columns)
    assert any(not r["answers"]["text"] for r in rows), "the tiny v2 data must contain unanswerable rows"


def test_mnli_two_validation_files_and_label_names(tmp_path):
    files = write_tiny_glue(tmp_path, "mnli", n_train=9, n_val=5)
    matched, mismatched = files.validation_file.split(",")
    named = [dict(r, label=["entailment", "neutral", "contradiction"][r["label"]]) for r in _read_jsonl(matched)]
    named_path = tmp_path / "named.jsonl"
    named_path.write_text("".join(json.dumps(r) + "\n" for r in named))
    splits = load_raw_splits("glue_mnli", train_file=files.train_file, validation_file=f"{named_path},{mismatched}")
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert splits["validation_matched"]["label"] == [r["label"] for r in _read_jsonl(matched)]
    assert splits["validation_mismatched"]["label"] == [r["label"] for r in _read_jsonl(mismatched)]


def test_missing_idx_is_filled_and_limits_apply(tmp_path, mrpc):
    rows = [{k: v for k, v in r.items() if k != "idx"} for r in _read_jsonl(mrpc.train_file)]
    path = tmp_path / "noidx.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_raw_splits("glue_mrpc", train_file=str(path), validation_file=mrpc.validation_file,
                             max_train_examples=5, max_eval_examples=2)
    assert splits["train"]["idx"] == [0, 1, 2, 3, 4] and len(splits["validation"]) == 2


def test_clear_errors_for_bad_files(tmp_path, mrpc):
    with pytest.raises(DataError, match=r"data file '.*nope.jsonl' does not exist"):
        validate_data_files("glue_mrpc", str(tmp_path / "nope.jsonl"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": "a", oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl' is not valid JSON lines: line 2"):
        validate_data_files("glue_mrpc", str(bad_json))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"sentence": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"missing.jsonl' lacks column\(s\) sentence1, sentence2 needed by task glue_"):
        validate_data_files("glue_mrpc", "", str(missing))
    bad_label = tmp_path / "label.jsonl"
    bad_label.write_text('{"sentence1": "a", "sentence2": "b", "label": 7}\n')
    with pytest.raises(DataError, match="label 7 is outside 0..1"):
        validate_data_files("glue_mrpc", str(bad_label))
    parquet = tmp_path / "cols.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "context": "c"}]), parquet)
    with pytest.raises(DataError, match="lacks column\\(s\\) id, answers"):
        load_raw_splits("squad", train_file=str(parquet))
    not_parquet = tmp_path / "junk.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(DataError, match="not a valid parquet file"):
        validate_data_files("glue_mrpc", str(not_parquet))
    text_file = tmp_path / "rows.txt"
    text_file.write_text("a b c\n")
    with pytest.raises(DataError, match="unsupported extension"):
        validate_data_files("glue_mrpc", str(text_file))
    with pytest.raises(DataError, match="lists 2 files but task glue_mrpc has 1 validation split"):
        validate_data_files("glue_mrpc", "", f"{mrpc.validation_file},{mrpc.validation_file}")
    bad_answers = tmp_path / "answers.jsonl"
    bad_answers.write_text(json.dumps({"id": "1", "context": "c", "question": "q", "answers": {"text": ["c"]}}) + "\n")
    with pytest.raises(DataError, match="answers must be"):
        validate_data_files("squad", str(bad_answers))


def test_hub_failures_name_the_dataset_and_the_way_out():
    with pytest.raises(DataError, match=r"'nyu-mll/glue' \(config 'rte'\).*data.train_file"):
        load_raw_splits("glue_rte", source="hub")
    with pytest.raises(DataError, match="data.source must be one of"):
        load_raw_splits("glue_rte", source="s3")


def test_label_forms_accepted_and_rejected(tmp_path):
    good = tmp_path / "labels.csv"
    good.write_text("sentence,label\nfine words,1.0\nmore words,acceptable\nbad words,unacceptable\nx,0\n")
    splits = load_raw_splits("glue_cola", train_file=str(good))
    assert splits["train"]["label"] == [1, 1, 0, 0] and splits["train"]["idx"] == [0, 1, 2, 3]
    fractional = tmp_path / "fractional.csv"
    fractional.write_text("sentence,label\nfine words,1.5\n")
    with pytest.raises(DataError, match="label '1.5' is not a class id"):
        load_raw_splits("glue_cola", train_file=str(fractional))
    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        '{"sentence1": "a", "sentence2": "b", "label": 3.25}\n{"sentence1": "a", "sentence2": "b", "label": "x"}\n'
    )
    with pytest.raises(DataError, match="row 2: label 'x' is not a number"):
        validate_data_files("glue_stsb", str(scores))


def test_tfds_source_is_refused_with_the_alternatives():
    from adapad_jax.config.schema import ConfigError, base_config
    from adapad_jax.config.validation import check_fields

    with pytest.raises(DataError, match=r"data.source=tfds is not supported .*data.source=hub.*data.train_file"):
        load_raw_splits("glue_rte", source="tfds")
    config = base_config()
    config.output_dir = "x"
    config.data.source = "tfds"
    with pytest.raises(ConfigError, match=r"data.source=tfds is not supported"):
        check_fields(config)


# ---------------------------------------------------------------------------------------------- task=custom


def _custom_config(tmp_path, train_rows, val_rows, **data):
    from adapad_jax.config.schema import base_config

    config = base_config()
    config.task, config.output_dir = "custom", str(tmp_path / "run")
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    val.write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    config.data.train_file, config.data.validation_file = str(train), str(val)
    config.data.text_columns, config.data.label_column = ("review",), "verdict"
    for key, value in data.items():
        config.data[key] = value
    return config


def _reviews(labels):
    return [{"review": f"review number {i}", "verdict": v} for i, v in enumerate(labels)]


@pytest.mark.parametrize("labels, kind, names", [
    (["meh", "good", "bad", "good"], "classification", ("bad", "good", "meh")),
    ([10, 2, 2, 1], "classification", ("1", "2", "10")),  # whole numbers sort numerically
    (["0", "1", "1"], "classification", ("0", "1")),
    ([0.5, 3.0, 4.25], "regression", ()),
])
def test_custom_task_takes_problem_type_and_label_names_from_the_training_data(tmp_path, labels, kind, names):
    from adapad_jax.data.custom import prepare_config
    from adapad_jax.config.validation import task_spec_for

    config = _custom_config(tmp_path, _reviews(labels), _reviews(labels[:2]))
    prepare_config(config, log=lambda _: None)
    spec = task_spec_for(config)
    assert (config.data.problem_type, tuple(config.data.label_names)) == (kind, names)
    assert spec.kind == kind and spec.text_columns == ("review",) and spec.label_column == "verdict"
    assert spec.num_labels == (len(names) if names else 1)
    splits = load_raw_splits(spec, train_file=config.data.train_file, validation_file=config.data.validation_file)
    expected = [float(v) for v in labels] if kind == "regression" else [names.index(str(v)) for v in labels]
    assert splits["train"]["verdict"] == expected
    assert spec.metric_names == (("pearson", "spearmanr") if kind == "regression"
                                 else ("accuracy", "f1") if len(names) == 2 else ("accuracy",))


def test_custom_spec_asked_for_before_its_labels_are_known_names_what_fills_them(tmp_path):
    from adapad_jax.data import custom
    from adapad_jax.run import core

    config = _custom_config(tmp_path, _reviews([0, 1]), _reviews([1]))
    with pytest.raises(DataError, match=r"prepare_config \(adapad_jax/data/custom.py\) fills them in from the "
                                        r"training data, which adapad_jax.run.core.run calls first$"):
        custom.custom_task_spec(config)
    assert callable(custom.prepare_config) and callable(core.run)  # the places the message names exist


def test_custom_task_given_names_problem_type_and_metric(tmp_path):
    from adapad_jax.data.custom import prepare_config
    from adapad_jax.config.validation import task_spec_for

    config = _custom_config(tmp_path, _reviews([0, 1, 1]), _reviews([1]), label_names=("neg", "pos"),
                            problem_type="classification", metric="matthews_correlation")
    prepare_config(config, log=lambda _: None)
    spec = task_spec_for(config)
    assert spec.label_names == ("neg", "pos") and spec.main_metric == "matthews_correlation"
    config = _custom_config(tmp_path, _reviews([0, 1, 1]), _reviews([1]), problem_type="regression")
    prepare_config(config, log=lambda _: None)
    assert task_spec_for(config).kind == "regression"  # whole-number scores, regression because it is asked for


@pytest.mark.parametrize("data, message", [
    (dict(text_columns=()), "task=custom needs data.text_columns: one column name or two"),
    (dict(text_columns=("a", "b", "c")), "task=custom needs data.text_columns"),
    (dict(label_column="review"), "data.label_column='review' must name a column other than the text columns"),
    (dict(metric="pearson", problem_type="classification"), "data.metric=pearson does not fit"),
    (dict(label_names=("only",)), "names one class"),
    (dict(problem_type="sorting"), "data.problem_type='sorting' is not one of"),
])
def test_custom_task_bad_fields_are_one_line_config_errors(tmp_path, data, message):
    from adapad_jax.config.schema import ConfigError
    from adapad_jax.config.validation import check_fields

    config = _custom_config(tmp_path, _reviews(["a", "b"]), _reviews(["a"]), **data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_fields(config)


def test_custom_fields_are_refused_for_a_glue_task(tmp_path):
    from adapad_jax.config.schema import ConfigError
    from adapad_jax.config.validation import check_fields

    config = _custom_config(tmp_path, _reviews(["a", "b"]), _reviews(["a"]))
    config.task = "glue_sst2"
    with pytest.raises(ConfigError, match="data.text_columns, data.label_names and data.dataset_name are for task"):
        check_fields(config)


def test_custom_task_data_problems_are_named_before_any_compute(tmp_path):
    from adapad_jax.data.custom import prepare_config

    # A label column that is not there: the columns the file does have are listed.
    config = _custom_config(tmp_path, _reviews(["a", "b"]), _reviews(["a"]), label_column="stars")
    with pytest.raises(DataError, match=r"lacks column\(s\) stars named by .* \(its columns: review, verdict\)"):
        prepare_config(config, log=lambda _: None)
    # A validation label the training data never had.
    config = _custom_config(tmp_path, _reviews(["bad", "good"]), _reviews(["good", "great"]))
    prepare_config(config, log=lambda _: None)
    from adapad_jax.config.validation import task_spec_for

    with pytest.raises(DataError, match=r"row 2: label 'great' is not a number or one of \['bad', 'good'\]"):
        validate_data_files(task_spec_for(config), config.data.train_file, config.data.validation_file)
    # Whole-number classes: a label the training data never had is not read as a class id.
    config = _custom_config(tmp_path, _reviews([10, 2, 1]), _reviews([2, 0]))
    prepare_config(config, log=lambda _: None)
    with pytest.raises(DataError, match=r"row 2: label 0 is not one of the classes \['1', '2', '10'\]"):
        validate_data_files(task_spec_for(config), config.data.train_file, config.data.validation_file)
    # One class only.
    config = _custom_config(tmp_path, _reviews(["good", "good"]), _reviews(["good"]))
    with pytest.raises(DataError, match="classification needs at least two"):
        prepare_config(config, log=lambda _: None)


def test_custom_task_from_a_dataset_takes_its_classlabel_names(tmp_path):
    # datasets.load_dataset on a folder of train/validation parquet files, the hub code path: the parquet
    # metadata keeps the ClassLabel, whose names (not the ids seen) are the classes.
    import datasets

    from adapad_jax.config.schema import base_config
    from adapad_jax.data.custom import prepare_config
    from adapad_jax.config.validation import task_spec_for

    features = datasets.Features({"a": datasets.Value("string"), "b": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["no", "maybe", "yes"])})
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, ys in (("train", [0, 2, 2]), ("validation", [2, 0])):
        rows = {"a": [f"first {i}" for i in range(len(ys))], "b": [f"second {i}" for i in range(len(ys))], "y": ys}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    config = base_config()
    config.task, config.output_dir = "custom", str(tmp_path / "run")
    config.data.dataset_name, config.data.text_columns, config.data.label_column = str(folder), ("a", "b"), "y"
    config.data.metric = "matthews_correlation"
    prepare_config(config, log=lambda _: None)
    spec = task_spec_for(config)
    assert spec.label_names == ("no", "maybe", "yes") and spec.num_labels == 3 and spec.kind == "classification"
    assert spec.metric_names == ("matthews_correlation", "accuracy")
    splits = load_raw_splits(spec)
    assert splits["train"]["y"] == [0, 2, 2] and splits["validation"]["y"] == [2, 0]
    assert splits["validation"]["a"] == ["first 0", "first 1"]
    config.data.text_columns, config.data.label_names, config.data.problem_type = ("a", "c"), (), "auto"
    with pytest.raises(DataError, match=r"hub dataset .*pairs lacks column\(s\) c named by .* \(its columns: a, b, y\)"):
        prepare_config(config, log=lambda _: None)
