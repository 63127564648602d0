"""Life after training on tiny stand-ins: adapad-predict on new files, the model card, merged dtype + tokenizer.

One tiny run per backbone (MNLI on DeBERTaV3: two splits, named labels; SQuAD v2 on Qwen3: no-answer
probabilities), then:
- predictions on unlabelled files (GLUE TSVs, official nested SQuAD json) equal the run's own evaluation
  outputs for the same rows, in the benchmark servers' formats; labelled files also give the run's metrics;
- the run directory is left byte-for-byte alone;
- adapter/README.md describes the run (base model, task, method, budget, ranks from ranks.json, metrics, the
  Qwen3 key_mapping trap);
- a bfloat16 merged export loads in transformers with AutoTokenizer from the same folder and matches the PEFT
  adapter on the float32 base model up to bfloat16 rounding.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapad_jax.run import core as run_lib
from adapad_jax.run import saved_run
from adapad_jax.run.prediction import predict

from test_e2e_runs import read_jsonl, tiny_run_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mnli_run(tmp_path_factory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("mnli")
    config = tiny_run_config(tmp, "glue_mnli", "deberta")
    run_lib.run(config, progress=False, log=lambda _: None)
    return tmp, config


@pytest.fixture(scope="module")
def squad_run(tmp_path_factory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("squad")
    config = tiny_run_config(tmp, "squad_v2", "qwen3")
    run_lib.run(config, progress=False, log=lambda _: None)
    return tmp, config


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory) -> tuple[Path, object, list[dict]]:
    """task=custom on a tiny DeBERTa: a `review` column, a `verdict` column of names, TSV train / CSV dev."""
    import csv

    tmp = tmp_path_factory.mktemp("custom")
    config = tiny_run_config(tmp, "glue_sst2", "deberta")
    names = ("bad", "good")

    def reviews(path: str) -> list[dict]:
        return [{"review": r["sentence"], "verdict": names[r["label"]]} for r in read_jsonl(Path(path))]

    train, dev = reviews(config.data.train_file), reviews(config.data.validation_file)
    (tmp / "reviews_train.tsv").write_text("review\tverdict\n" + "".join(f"{r['review']}\t{r['verdict']}\n"
                                                                        for r in train))
    with (tmp / "reviews_dev.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "verdict"])
        writer.writeheader()
        writer.writerows(dev)
    config.task = "custom"
    config.data.train_file, config.data.validation_file = str(tmp / "reviews_train.tsv"), str(tmp / "reviews_dev.csv")
    config.data.text_columns, config.data.label_column = ("review",), "verdict"
    lines = []
    run_lib.run(config, progress=False, log=lines.append)
    assert any("task custom: classification of review -> verdict (2 classes: bad, good)" in line for line in lines)
    return tmp, config, dev


def test_custom_task_trains_evaluates_exports_and_predicts_with_its_label_names(custom_run, tmp_path):
    from transformers import pipeline

    tmp, config, dev = custom_run
    run_dir = Path(config.output_dir)
    results = json.loads((run_dir / "eval_results.json").read_text())
    rows = read_jsonl(run_dir / "predictions.jsonl")
    gold = np.array([("bad", "good").index(r["verdict"]) for r in dev])
    predicted = np.array([int(np.argmax(r["logits"])) for r in rows])
    assert len(rows) == len(dev) and results["metrics"]["accuracy"] == pytest.approx(np.mean(predicted == gold))
    true_positive = np.sum((predicted == 1) & (gold == 1))
    f1 = 2 * true_positive / (np.sum(predicted == 1) + np.sum(gold == 1))
    assert results["metrics"]["f1"] == pytest.approx(f1)
    saved = json.loads((run_dir / "config.json").read_text())["data"]
    assert saved["label_names"] == ["bad", "good"] and saved["problem_type"] == "classification"

    out = saved_run.export_checkpoint(run_dir, out_dir=str(tmp_path / "x"), merged=True, log=lambda _: None)
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert merged_config["id2label"] == {"0": "bad", "1": "good"}
    classify = pipeline("text-classification", model=str(out / "merged"), tokenizer=str(out / "merged"), top_k=None)
    assert sorted(s["label"] for s in classify([dev[0]["review"]])[0]) == ["bad", "good"]

    test_file = tmp_path / "new_reviews.tsv"
    test_file.write_text("review\n" + "".join(f"{r['review']}\n" for r in dev))
    predicted_dir = predict(run_dir, str(test_file), out_dir=str(tmp_path / "p"), log=lambda _: None)
    lines = (predicted_dir / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t")[1] for line in lines[1:]] == [("bad", "good")[p] for p in predicted]


def test_glue_predict_writes_submission_tsvs_and_metrics_without_touching_the_run(mnli_run, tmp_path):
    tmp, config = mnli_run
    run_dir = Path(config.output_dir)
    before = _snapshot(run_dir)
    own = {(r["split"], r["idx"]): r for r in read_jsonl(run_dir / "predictions.jsonl")}
    # Unlabelled test files as GLUE ships them: TSV, an `index` column, no label.
    tsvs = []
    for split, path in zip(("validation_matched", "validation_mismatched"), config.data.validation_file.split(",")):
        rows = read_jsonl(Path(path))
        tsv = tmp_path / f"{split}.tsv"
        tsv.write_text("index\tpremise\thypothesis\n" + "".join(
            f"{r['idx']}\t{r['premise']}\t{r['hypothesis']}\n" for r in rows))
        tsvs.append(str(tsv))
    out = predict(run_dir, ",".join(tsvs), out_dir=str(tmp_path / "test"), log=lambda _: None)
    names = ("entailment", "neutral", "contradiction")
    for split, file_name in (("validation_matched", "MNLI-m.tsv"), ("validation_mismatched", "MNLI-mm.tsv")):
        lines = (out / file_name).read_text().splitlines()
        assert lines[0] == "index\tprediction"
        expected = [(idx, r) for (s, idx), r in sorted(own.items()) if s == split]
        assert len(lines) - 1 == len(expected) > 0
        for line, (idx, row) in zip(lines[1:], expected):
            index, label = line.split("\t")
            assert int(index) == idx and label == names[int(np.argmax(row["logits"]))]
    ours = {(r["split"], r["idx"]): r for r in read_jsonl(out / "predictions.jsonl")}
    assert ours.keys() == own.keys()
    for key, row in own.items():
        np.testing.assert_allclose(ours[key]["logits"], row["logits"], atol=1e-5)
    assert not (out / "metrics.json").exists()  # no labels, no metrics

    labelled = predict(run_dir, config.data.validation_file, out_dir=str(tmp_path / "dev"), log=lambda _: None)
    metrics = json.loads((labelled / "metrics.json").read_text())["metrics"]
    saved = json.loads((run_dir / "eval_results.json").read_text())["metrics"]
    assert metrics.keys() == saved.keys() and all(abs(metrics[k] - saved[k]) < 1e-6 for k in saved)
    assert _snapshot(run_dir) == before


def test_squad_v2_predict_writes_official_predictions_and_na_probs(squad_run, tmp_path):
    tmp, config = squad_run
    run_dir = Path(config.output_dir)
    own = {r["id"]: r for r in read_jsonl(run_dir / "predictions.jsonl")}
    rows = read_jsonl(Path(config.data.validation_file))
    # The official nested format (as in dev-v2.0.json), without answers.
    official = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"]}]} for r in rows]}]}
    test_file = tmp_path / "test-v2.0.json"
    test_file.write_text(json.dumps(official))
    out = predict(run_dir, str(test_file), out_dir=str(tmp_path / "out"), log=lambda _: None)
    predictions = json.loads((out / "predictions.json").read_text())
    na_probs = json.loads((out / "na_probs.json").read_text())
    assert predictions.keys() == na_probs.keys() == own.keys()
    for qid, row in own.items():
        assert predictions[qid] == row["prediction_text"]
        assert abs(na_probs[qid] - row["no_answer_probability"]) < 1e-5
    assert not (out / "metrics.json").exists()


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def test_model_card_describes_the_run(mnli_run, squad_run):
    from huggingface_hub import ModelCard

    for (_, config), snippet, tag in ((mnli_run, "AutoModelForSequenceClassification", "text-classification"),
                                      (squad_run, 'key_mapping={r"^model\\.": "transformer."}', "question-answering")):
        run_dir = Path(config.output_dir)
        card = ModelCard.load(run_dir / "adapter" / "README.md")
        ranks = json.loads((run_dir / "ranks.json").read_text())
        metrics = json.loads((run_dir / "eval_results.json").read_text())["metrics"]
        assert card.data.base_model == config.model.name_or_path and card.data.library_name == "peft"
        assert card.data.pipeline_tag == tag and card.data.datasets == [("nyu-mll/glue" if tag != "question-answering"
                                                                         else "rajpurkar/squad_v2")]
        assert {"lora", "adapad"} <= set(card.data.tags)
        assert {r.metric_name: r.metric_value for r in card.data.eval_results} == _numeric(metrics)
        assert all(r.task_type == tag for r in card.data.eval_results)
        assert f"`{config.task}`" in card.text and "AdaPaD" in card.text
        # Only len(ranks) x r_max of the configured budget can ever be committed, and the card says so.
        assert len(ranks) * config.adapter.r_max < config.adapter.rank_budget
        assert (f"global rank budget {config.adapter.rank_budget}, of which {len(ranks) * config.adapter.r_max} is "
                f"reachable ({len(ranks)} modules x r_max {config.adapter.r_max}") in card.text
        assert f"total rank **{sum(ranks.values())}** over {len(ranks)} adapted modules" in card.text
        main = next(iter(metrics))
        assert f"| {main} | {metrics[main]:.4f} |" in card.text
        assert snippet in card.text and "PeftModel.from_pretrained" in card.text
    assert "id2label={0: 'entailment', 1: 'neutral', 2: 'contradiction'}" in (
        Path(mnli_run[1].output_dir) / "adapter" / "README.md").read_text()


def test_merged_export_has_a_transformers_model_card_with_the_base_license(mnli_run, tmp_path):
    from huggingface_hub import ModelCard, ModelCardData

    tmp, config = mnli_run
    run_dir = Path(config.output_dir)
    base_card = tmp / "ckpt" / "README.md"
    base_card.write_text(f"---\n{ModelCardData(license='mit').to_yaml()}\n---\n\n# tiny base\n")
    try:
        out = saved_run.export_checkpoint(run_dir, out_dir=str(tmp_path / "x"), merged=True, log=lambda _: None)
    finally:
        base_card.unlink()
    merged = ModelCard.load(out / "merged" / "README.md")
    adapter = ModelCard.load(out / "adapter" / "README.md")
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert merged.data.library_name == "transformers" and adapter.data.library_name == "peft"
    assert merged.data.license == adapter.data.license == "mit"
    assert merged.data.base_model == config.model.name_or_path and merged.data.pipeline_tag == "text-classification"
    assert {r.metric_name: r.metric_value for r in merged.data.eval_results} == _numeric(results["metrics"])
    assert {r.dataset_split for r in merged.data.eval_results} == {"validation_matched", "validation_mismatched"}
    assert f"step {results['step']}" in merged.text and 'pipeline("text-classification"' in merged.text


def test_bf16_merged_export_has_tokenizer_and_matches_peft(mnli_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp, config = mnli_run
    run_dir = Path(config.output_dir)
    out = saved_run.export_checkpoint(run_dir, out_dir=str(tmp_path / "x"), merged=True, merged_dtype="bfloat16",
                                    log=lambda _: None)
    assert (out / "adapter" / "README.md").is_file()
    merged_tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    base_tok = AutoTokenizer.from_pretrained(str(tmp / "ckpt"))
    text = ["Wen described the old village near the river.", "The garden was admired by Rosa."]
    assert merged_tok(*text)["input_ids"] == base_tok(*text)["input_ids"]

    merged = AutoModelForSequenceClassification.from_pretrained(str(out / "merged"))
    assert merged.dtype == torch.bfloat16
    base = AutoModelForSequenceClassification.from_pretrained(str(tmp / "ckpt"), num_labels=3).eval()
    batch = base_tok([text[0], text[1]], [text[1], text[0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        without_adapter = base(**batch).logits.double()
        reference = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(**batch).logits.double()
        ours = merged.eval()(**batch).logits.double()
    adapter_effect = float((without_adapter - reference).abs().max())
    assert adapter_effect > 1e-2  # the adapters matter, so matching them means something
    assert float((ours - reference).abs().max()) < 0.1 * adapter_effect, (ours, reference, without_adapter)


def test_merged_checkpoint_pipeline_shows_the_task_label_names(mnli_run, tmp_path):
    from transformers import pipeline

    _, config = mnli_run
    out = saved_run.export_checkpoint(Path(config.output_dir), out_dir=str(tmp_path / "x"), merged=True,
                                      log=lambda _: None)
    names = ["entailment", "neutral", "contradiction"]
    saved = json.loads((out / "merged" / "config.json").read_text())
    assert saved["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert saved["label2id"] == {n: i for i, n in enumerate(names)}
    classify = pipeline("text-classification", model=str(out / "merged"), tokenizer=str(out / "merged"), top_k=None)
    scores = classify({"text": "Wen described the old village.", "text_pair": "Rosa admired the garden."})
    assert sorted(s["label"] for s in scores) == sorted(names)


def test_predict_cli_bad_input_is_one_line(mnli_run, tmp_path):
    _, config = mnli_run
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tsentence\n0\thello\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "predict.py"), "--run_dir", config.output_dir,
         f"--config.data.test_file={bad}"],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: test file '{bad}' lacks column(s) premise, hypothesis needed by task glue_mnli "
        "(row 1; required: premise, hypothesis)"
    ]
