"""adapad-predict's input handling and output formats, without a model (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapad_jax.config.schema import ConfigError, base_config
from adapad_jax.data.tasks import DataError, get_task
from adapad_jax.run.prediction import _read_rows, glue_submission_lines, normalise_test_rows, predict


def test_glue_rows_labelled_unlabelled_and_indexed(tmp_path):
    spec = get_task("glue_rte")
    tsv = tmp_path / "RTE_test.tsv"
    tsv.write_text('index\tsentence1\tsentence2\n5\ta "quoted" b\tc\n9\td\te\n')
    rows, labelled = normalise_test_rows(spec, tsv, _read_rows(tsv))
    assert not labelled
    assert rows == [{"sentence1": 'a "quoted" b', "sentence2": "c", "idx": 5, "label": 0},
                    {"sentence1": "d", "sentence2": "e", "idx": 9, "label": 0}]
    hub_test = [{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}]
    assert normalise_test_rows(spec, tsv, hub_test)[1] is False
    named = [{"sentence1": "a", "sentence2": "b", "label": "not_entailment"}]
    rows, labelled = normalise_test_rows(spec, tsv, named)
    assert labelled and rows[0]["label"] == 1 and rows[0]["idx"] == 0
    with pytest.raises(DataError, match="row 1: label 7 is outside 0..1"):
        normalise_test_rows(spec, tsv, [{"sentence1": "a", "sentence2": "b", "label": 7}])
    with pytest.raises(DataError, match="lacks column\\(s\\) sentence2"):
        normalise_test_rows(spec, tsv, [{"sentence1": "a"}])


def test_squad_rows_count_as_labelled_only_with_an_answer(tmp_path):
    spec = get_task("squad_v2")
    base = {"id": "q", "context": "abc", "question": "?"}
    assert normalise_test_rows(spec, tmp_path / "f.json", [base])[1] is False
    empty = {**base, "answers": {"text": [], "answer_start": []}}
    assert normalise_test_rows(spec, tmp_path / "f.json", [empty])[1] is False
    answered = {**base, "id": "r", "answers": {"text": ["abc"], "answer_start": [0]}}
    assert normalise_test_rows(spec, tmp_path / "f.json", [empty, answered])[1] is True


def test_glue_submission_format_follows_the_glue_server():
    rows = [{"idx": 3, "label": 2}, {"idx": 4, "label": 0}]
    assert glue_submission_lines(get_task("glue_mnli"), rows) == [
        "index\tprediction", "3\tcontradiction", "4\tentailment"]
    assert glue_submission_lines(get_task("glue_cola"), [{"idx": 0, "label": 1}]) == ["index\tprediction", "0\t1"]
    assert glue_submission_lines(get_task("glue_stsb"), [{"idx": 1, "label": 3.25}]) == [
        "index\tprediction", "1\t3.250000"]


def _fake_run(tmp_path: Path, task: str) -> Path:
    config = base_config()
    config.task, config.output_dir = task, str(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(config.to_json())
    return tmp_path


def test_bad_predict_input_is_refused_before_any_model_is_loaded(tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory"):
        predict(tmp_path / "nothing", "x.jsonl")
    run_dir = _fake_run(tmp_path / "demo", "demo")
    with pytest.raises(ConfigError, match="is a demo run: predictions are for GLUE and SQuAD runs"):
        predict(run_dir, "x.jsonl")
    run_dir = _fake_run(tmp_path / "rte", "glue_rte")
    with pytest.raises(ConfigError, match="no test file given"):
        predict(run_dir, "")
    with pytest.raises(DataError, match="unsupported extension"):
        predict(run_dir, str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="does not exist"):
        predict(run_dir, str(tmp_path / "x.jsonl"))
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"sentence1": "a", "sentence2": "b"}) + "\n")
    with pytest.raises(ConfigError, match="is the run directory"):
        predict(run_dir, str(good), out_dir=str(run_dir))
    with pytest.raises(ConfigError, match="--out '.*' cannot be created: '.*ok.jsonl' is a file, not a directory"):
        predict(run_dir, str(good), out_dir=str(good / "predictions"))  # bad input (exit 2), as for output_dir
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
