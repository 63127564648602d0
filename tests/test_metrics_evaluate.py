"""Model outputs over an eval set -> predictions.jsonl rows and metrics (GLUE and SQuAD, tiny data)."""

import numpy as np
import pytest
from scipy import stats

from adapad_jax.data import BATCH_KEYS, build_task_data, concat_eval_outputs, eval_batches, load_tokenizer
from adapad_jax.data.squad import NOT_CONTEXT
from adapad_jax.metrics import compute_metrics, evaluate_task, main_metric_key
from adapad_jax.testing.tiny import train_bpe_tokenizer, write_tiny_glue, write_tiny_squad


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(directory)
    return load_tokenizer(str(directory))


def _run_batched(features, batch_size, model):
    """Feed padded eval batches to a fake model of the row numbers and undo the padding, as the trainer does."""
    count = len(next(iter(features.values())))
    with_rows = {**features, "row": np.arange(count)}
    batches = list(eval_batches(with_rows, batch_size, keys=BATCH_KEYS + ("row",)))
    assert all(len(b["row"]) == batch_size for b in batches)
    return concat_eval_outputs([model(b["row"]) for b in batches], count)


def test_glue_rows_and_metrics_from_logits(tokenizer, tmp_path):
    files = write_tiny_glue(tmp_path, "mnli", n_train=4, n_val=7)
    data = build_task_data("glue_mnli", tokenizer, validation_file=files.validation_file, include_train=False)
    rng = np.random.default_rng(0)
    outputs = {}
    for split, eval_set in data.evals.items():
        logits = rng.normal(size=(eval_set.num_features, 3)).astype(np.float32)
        outputs[split] = _run_batched(eval_set.features, 4, lambda rows, l=logits: {"logits": l[rows]})
    metrics, rows = evaluate_task(data, outputs)
    assert set(metrics) == {"validation_matched/accuracy", "validation_mismatched/accuracy"}
    assert main_metric_key("glue_mnli") == "validation_matched/accuracy"
    for split, eval_set in data.evals.items():
        split_rows = [r for r in rows if r["split"] == split]
        assert [r["idx"] for r in split_rows] == list(eval_set.examples["idx"])
        predicted = [r["label"] for r in split_rows]
        assert predicted == np.argmax(outputs[split]["logits"], axis=1).tolist()
        np.testing.assert_allclose([r["logits"] for r in split_rows], outputs[split]["logits"], rtol=1e-6)
        expected = np.mean(np.array(predicted) == np.array(eval_set.examples["label"]))
        assert metrics[f"{split}/accuracy"] == pytest.approx(expected)


def test_cola_and_stsb_rows(tokenizer, tmp_path):
    for task, width in (("cola", 2), ("stsb", 1)):
        files = write_tiny_glue(tmp_path / task, task, n_train=4, n_val=9)
        data = build_task_data(f"glue_{task}", tokenizer, validation_file=files.validation_file, include_train=False)
        logits = np.random.default_rng(1).normal(size=(9, width))
        metrics, rows = evaluate_task(data, {"validation": {"logits": logits}})
        assert "split" not in rows[0] and set(rows[0]) == {"idx", "label", "logits"}
        references = data.evals["validation"].examples["label"]
        if task == "cola":  # Matthews correlation from the confusion counts, written out
            p, g = logits.argmax(1), np.asarray(references)
            tp, tn = np.sum((p == 1) & (g == 1)), np.sum((p == 0) & (g == 0))
            fp, fn = np.sum((p == 1) & (g == 0)), np.sum((p == 0) & (g == 1))
            assert min(tp + fp, tp + fn, tn + fp, tn + fn) > 0, "a degenerate case would not test the formula"
            expected = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
            assert set(metrics) == {"matthews_correlation"}
            assert metrics["matthews_correlation"] == pytest.approx(expected)
        else:  # Pearson and Spearman from scipy
            assert [r["label"] for r in rows] == pytest.approx(logits[:, 0].tolist())
            assert metrics == pytest.approx({"pearson": stats.pearsonr(logits[:, 0], references)[0],
                                             "spearmanr": stats.spearmanr(logits[:, 0], references)[0]})


def _oracle_logits(eval_set):
    """Logits that peak on the gold answer's tokens (or on position 0 for unanswerable questions)."""
    qa = eval_set.qa
    count, length = qa.arrays["input_ids"].shape
    start_logits = np.zeros((count, length), np.float32)
    end_logits = np.zeros((count, length), np.float32)
    for w in range(count):
        answers = eval_set.examples[int(qa.example_index[w])]["answers"]
        offsets = qa.offset_mapping[w]
        start_logits[w, 0] = end_logits[w, 0] = 1.0
        if not answers["text"]:
            start_logits[w, 0] = end_logits[w, 0] = 20.0
            continue
        first, last = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
        context = offsets[:, 0] != NOT_CONTEXT
        starts = np.flatnonzero(context & (offsets[:, 0] <= first) & (offsets[:, 1] > first))
        ends = np.flatnonzero(context & (offsets[:, 0] < last) & (offsets[:, 1] >= last))
        if len(starts) and len(ends):
            start_logits[w, starts[0]] = end_logits[w, ends[0]] = 10.0
    return {"start_logits": start_logits, "end_logits": end_logits}


@pytest.mark.parametrize("version", [1, 2])
def test_squad_oracle_logits_give_perfect_scores_and_rows(tokenizer, tmp_path, version):
    files = write_tiny_squad(tmp_path, version=version, n_train=4, n_val=10, max_facts=12)
    task = "squad" if version == 1 else "squad_v2"
    data = build_task_data(task, tokenizer, validation_file=files.validation_file, include_train=False,
                           max_length=48, doc_stride=12)
    eval_set = data.evals["validation"]
    oracle = _oracle_logits(eval_set)
    # run through padded batches of 4 windows, as the trainer would
    batched = _run_batched(eval_set.features, 4, lambda rows: {k: v[rows] for k, v in oracle.items()})
    np.testing.assert_array_equal(batched["start_logits"], oracle["start_logits"])
    metrics, rows = evaluate_task(data, {"validation": batched})
    assert [r["id"] for r in rows] == list(eval_set.examples["id"])
    if version == 1:
        assert metrics == pytest.approx({"exact_match": 100.0, "f1": 100.0})
        assert set(rows[0]) == {"id", "prediction_text"}
    else:
        assert metrics["exact"] == 100.0 and metrics["HasAns_exact"] == 100.0 and metrics["NoAns_exact"] == 100.0
        assert set(rows[0]) == {"id", "prediction_text", "no_answer_probability"}
        for row, answers in zip(rows, eval_set.examples["answers"]):
            assert (row["prediction_text"] == "") == (not answers["text"])
            assert (row["no_answer_probability"] > 0.5) == (not answers["text"])
    # a perturbed answer costs exact match on that question only
    rows_text = {r["id"]: r["prediction_text"] for r in rows}
    first_answerable = next(i for i, a in zip(eval_set.examples["id"], eval_set.examples["answers"]) if a["text"])
    rows_text[first_answerable] = "wrong words"
    references = dict(zip(eval_set.examples["id"], eval_set.examples["answers"]))
    score = compute_metrics(task, rows_text, references)
    assert score["exact_match" if version == 1 else "exact"] == pytest.approx(100 * 9 / 10)

