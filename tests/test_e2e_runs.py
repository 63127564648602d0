"""End to end on tiny local stand-ins: every task kind, both backbones, every output, PEFT reproduces JAX.

Each run trains a few steps on a random tiny checkpoint (DeBERTaV3 or Qwen3 architecture, offline-trained
tokenizer) with a few dozen rows in the real dataset schema, then checks:
- every output file exists (metrics.jsonl, eval_results.json, predictions.jsonl, checkpoints/, adapter/,
  ranks.json, ranks.png, config.json);
- the metrics in eval_results.json equal the metrics recomputed from predictions.jsonl and the raw
  validation file (by hand: GLUE with numpy/scipy, SQuAD from the official scripts' definitions);
- the exported PEFT adapter, loaded with peft.PeftModel.from_pretrained on the transformers model, gives
  the JAX model's outputs (and, for QA, the same predicted answers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapad_jax.run import core as run_lib
from adapad_jax.run import saved_run
from adapad_jax.config.schema import base_config
from adapad_jax.testing import tiny

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ATOL = 2e-4


def tiny_run_config(tmp: Path, task: str, family: str, **overrides):
    """A tiny checkpoint + data files for ``task`` and a config that trains a handful of steps on them."""
    kind = "qa" if task.startswith("squad") else "regression" if task == "glue_stsb" else "classification"
    build = tiny.build_tiny_deberta if family == "deberta" else tiny.build_tiny_qwen3
    build(tmp / "ckpt", task=kind, num_labels=3 if task == "glue_mnli" else 2, seed=1)
    if kind == "qa":
        files = tiny.write_tiny_squad(tmp / "data", version=2 if task == "squad_v2" else 1, n_train=24, n_val=8,
                                      max_facts=8)
    else:
        files = tiny.write_tiny_glue(tmp / "data", task, n_train=32, n_val=12)
    config = base_config()
    config.task = task
    config.output_dir = str(tmp / "run")
    config.model.name_or_path = str(tmp / "ckpt")
    config.data.train_file, config.data.validation_file = files.train_file, files.validation_file
    config.data.max_length = 64 if kind == "qa" else 32
    config.data.doc_stride = 24
    config.adapter.r_max = 2
    config.adapter.rank_budget = 100
    config.adapter.top_k = 3
    config.adapter.growth_interval = 2
    config.adapter.alpha = 4.0
    config.adapter.init_std = 0.3  # large enough that the adapters visibly change the outputs
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 1
    config.train.num_steps = 4
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 2
    for dotted, value in overrides.items():
        section, _, leaf = dotted.rpartition("__")
        (config[section] if section else config)[leaf] = value
    return config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_outputs(out: Path, ranks: dict[str, int]) -> None:
    """Every output is there and consistent with itself."""
    for name in ("metrics.jsonl", "eval_results.json", "predictions.jsonl", "ranks.json", "ranks.png", "config.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
    assert json.loads((out / "ranks.json").read_text()) == ranks
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert sorted(r for r in adapter_config["rank_pattern"].values()) == sorted(r for r in ranks.values() if r > 0)
    records = read_jsonl(out / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps and all(np.isfinite(r["loss"]) for r in records
                                                                             if "loss" in r)
    assert any(r.get("final") for r in records)
    rank = json.loads((out / "eval_results.json").read_text())["rank"]
    assert rank["total_rank"] == sum(ranks.values()) <= rank["reachable_total_rank"] <= rank["rank_budget"]
    assert rank["budget_spent_step"] is None or rank["budget_spent_step"] >= 0


def glue_metrics_by_hand(task: str, predicted: dict[int, float], gold: dict[int, float]) -> dict[str, float]:
    """GLUE metrics from scratch (numpy/scipy), independent of adapad_jax.metrics."""
    from scipy import stats

    ids = sorted(gold)
    p = np.array([predicted[i] for i in ids], dtype=float)
    g = np.array([gold[i] for i in ids], dtype=float)
    if task == "glue_stsb":
        return {"pearson": stats.pearsonr(p, g)[0], "spearmanr": stats.spearmanr(p, g)[0]}
    accuracy = float(np.mean(p == g))
    if task == "glue_cola":
        tp, tn = np.sum((p == 1) & (g == 1)), np.sum((p == 0) & (g == 0))
        fp, fn = np.sum((p == 1) & (g == 0)), np.sum((p == 0) & (g == 1))
        denominator = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        return {"matthews_correlation": float((tp * tn - fp * fn) / denominator) if denominator else 0.0}
    if task in ("glue_mrpc", "glue_qqp"):
        tp, fp, fn = np.sum((p == 1) & (g == 1)), np.sum((p == 1) & (g == 0)), np.sum((p == 0) & (g == 1))
        return {"accuracy": accuracy, "f1": float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0}
    return {"accuracy": accuracy}


def _squad_tokens(text: str) -> list[str]:
    """The official SQuAD normalisation (lower case, no punctuation, no a/an/the, single spaces), as tokens."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _squad_f1(prediction: list[str], gold: list[str]) -> float:
    from collections import Counter

    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics_by_hand(texts: dict, references: dict, version_2: bool) -> dict[str, float]:
    """SQuAD v1.1 EM/F1 or v2.0 exact/f1 with the HasAns/NoAns split, written from the official scripts'
    definitions, independent of adapad_jax.metrics (the v2 best-threshold search is not recomputed)."""
    exact, f1, answerable = {}, {}, {}
    for qid, answers in references.items():
        prediction = _squad_tokens(texts[qid])
        golds = [_squad_tokens(g) for g in answers["text"]]
        answerable[qid] = bool(answers["text"])
        if version_2:  # an unanswerable question has gold ""; F1 against an empty side is 1 only if both are
            golds = [g for g in golds if g] or [[]]
            f1[qid] = max(float(prediction == g) if not (prediction and g) else _squad_f1(prediction, g)
                          for g in golds)
        else:
            f1[qid] = max(_squad_f1(prediction, g) for g in golds)
        exact[qid] = max(float(prediction == g) for g in golds)

    def percent(scores: dict, ids: list) -> float:
        return 100.0 * sum(scores[q] for q in ids) / len(ids)

    ids = list(references)
    if not version_2:
        return {"exact_match": percent(exact, ids), "f1": percent(f1, ids)}
    out = {"exact": percent(exact, ids), "f1": percent(f1, ids), "total": float(len(ids))}
    for prefix, subset in (("HasAns", [q for q in ids if answerable[q]]), ("NoAns", [q for q in ids if not answerable[q]])):
        if subset:
            out.update({f"{prefix}_exact": percent(exact, subset), f"{prefix}_f1": percent(f1, subset),
                        f"{prefix}_total": float(len(subset))})
    return out


def check_metrics_agree_with_predictions(config, out: Path) -> None:
    """eval_results.json == metrics recomputed from predictions.jsonl and the raw validation file(s)."""
    from adapad_jax.data.tasks import get_task

    spec = get_task(config.task)
    saved = json.loads((out / "eval_results.json").read_text())["metrics"]
    rows = read_jsonl(out / "predictions.jsonl")
    files = config.data.validation_file.split(",")
    expected = {}
    for split, path in zip(spec.validation_splits, files):
        raw = read_jsonl(Path(path))
        split_rows = [r for r in rows if r.get("split", split) == split]
        prefix = f"{split}/" if len(files) > 1 else ""
        if spec.kind == "qa":
            assert sorted(r["id"] for r in split_rows) == sorted(r["id"] for r in raw)
            texts = {r["id"]: r["prediction_text"] for r in split_rows}
            references = {r["id"]: r["answers"] for r in raw}
            metrics = squad_metrics_by_hand(texts, references, spec.version_2)
        else:
            assert sorted(r["idx"] for r in split_rows) == sorted(r["idx"] for r in raw)
            for r in split_rows:  # the label is the argmax (or the value) of the logits
                expected_label = r["logits"][0] if spec.kind == "regression" else int(np.argmax(r["logits"]))
                assert r["label"] == pytest.approx(expected_label)
            metrics = glue_metrics_by_hand(config.task, {r["idx"]: r["label"] for r in split_rows},
                                           {r["idx"]: r["label"] for r in raw})
        expected.update({prefix + k: v for k, v in metrics.items()})
    assert set(expected) <= set(saved)
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, abs=1e-6), key


def torch_model_with_adapter(ckpt: Path, adapter_dir: Path, kind: str):
    """transformers model of the checkpoint, with and without the exported adapter loaded by PEFT."""
    import torch
    import transformers
    from peft import PeftModel

    auto = transformers.AutoModelForQuestionAnswering if kind == "qa" else \
        transformers.AutoModelForSequenceClassification
    base = auto.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    plain = auto.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return adapted, plain


def torch_outputs(model, features: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    import torch

    inputs = {k: torch.as_tensor(np.asarray(features[k], dtype=np.int64)) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(**inputs)
    if kind == "qa":
        return {"start_logits": out.start_logits.numpy(), "end_logits": out.end_logits.numpy()}
    return {"logits": out.logits.numpy()}


def check_peft_reproduces_jax(config, result) -> None:
    """PEFT on the transformers model == the JAX eval forward, on every validation row of every split."""
    from adapad_jax.metrics import predictions_from_outputs

    spec = result.data.spec
    kind = spec.kind
    adapted, plain = torch_model_with_adapter(Path(config.model.name_or_path), result.output_dir / "adapter", kind)
    rows = read_jsonl(result.output_dir / "predictions.jsonl")
    for split, eval_set in result.data.evals.items():
        jax_out = run_lib.predict_split(result.trainer, eval_set, int(config.train.eval_batch_size))
        torch_out = torch_outputs(adapted, eval_set.features, kind)
        base_out = torch_outputs(plain, eval_set.features, kind)
        for key, value in jax_out.items():
            np.testing.assert_allclose(torch_out[key], value, atol=ATOL, rtol=1e-4, err_msg=key)
            # The adapter (and trained head) must matter, or the comparison above proves nothing.
            assert np.max(np.abs(base_out[key] - value)) > 20 * ATOL, key
        _, _, torch_rows = predictions_from_outputs(spec, eval_set, torch_out)
        split_rows = [r for r in rows if r.get("split", split) == split]
        if kind == "qa":
            assert {r["id"]: r["prediction_text"] for r in torch_rows} == \
                {r["id"]: r["prediction_text"] for r in split_rows}
        else:
            for mine, theirs in zip(sorted(split_rows, key=lambda r: r["idx"]), sorted(torch_rows, key=lambda r: r["idx"])):
                np.testing.assert_allclose(mine["logits"], theirs["logits"], atol=ATOL, rtol=1e-4)


def train_and_check(tmp_path: Path, task: str, family: str, **overrides):
    config = tiny_run_config(tmp_path, task, family, **overrides)
    result = run_lib.run(config, progress=False, keep_trainer=True, log=lambda _: None)
    try:
        assert result.step == config.train.num_steps
        check_outputs(result.output_dir, result.ranks)
        check_metrics_agree_with_predictions(config, result.output_dir)
        check_peft_reproduces_jax(config, result)
    finally:
        result.trainer.close()
    return config, result


@pytest.mark.parametrize(
    "task, family, overrides",
    [
        ("glue_stsb", "deberta", {"adapter__method": "lora"}),  # regression, fixed-rank baseline
        ("glue_mnli", "deberta", {"adapter__method": "joint"}),  # three classes, two validation splits
        ("glue_mrpc", "qwen3", {}),  # sentence pair on a decoder (last-token classification)
        ("squad", "qwen3", {"mesh__data": 2, "mesh__components": 2}),  # QA on a (data, components) mesh
        ("squad_v2", "qwen3", {}),  # unanswerable questions, no_answer_probability
    ],
)
def test_tiny_end_to_end(tmp_path, task, family, overrides):
    config, result = train_and_check(tmp_path, task, family, **overrides)
    if config.adapter.method != "lora":
        assert sum(result.ranks.values()) > len(result.ranks)  # growth happened within the few steps
    if task == "squad_v2":
        rows = read_jsonl(result.output_dir / "predictions.jsonl")
        assert all(0.0 <= r["no_answer_probability"] <= 1.0 for r in rows)


def test_single_sentence_run_resumes_and_exports_any_checkpoint(tmp_path):
    """CoLA-like on DeBERTa: rerunning resumes from the checkpoints; launch/export.py rebuilds the same adapter."""
    import safetensors.numpy
    import torch
    import transformers

    config, first = train_and_check(tmp_path, "glue_cola", "deberta")
    config.train.num_steps = 6  # rerun with a longer schedule (re-planned, as asked): resumes at step 4
    config.train.extend_schedule = True
    messages = []
    second = run_lib.run(config, progress=False, log=messages.append)
    assert second.step == 6 and any("resuming" in m and "from step 4" in m for m in messages)
    train_steps = [r["step"] for r in read_jsonl(second.output_dir / "metrics.jsonl") if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]

    config.train.num_steps = 0  # evaluate and export only: the restored step-6 state, nothing trained
    again = run_lib.run(config, progress=False, log=lambda _: None)
    assert again.step == 6 and again.metrics == second.metrics and again.ranks == second.ranks

    out = tmp_path / "exported"
    env_path = {"PYTHONPATH": str(REPO)}
    import os

    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), "--run_dir", str(second.output_dir), "--step", "6",
         "--out", str(out), "--merged"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env_path}, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = safetensors.numpy.load_file(str(out / "adapter" / "adapter_model.safetensors"))
    written = safetensors.numpy.load_file(str(second.output_dir / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == written.keys()
    for key in written:
        np.testing.assert_array_equal(exported[key], written[key])
    assert json.loads((out / "ranks.json").read_text()) == second.ranks

    # The merged checkpoint is a plain transformers model that gives the run's logits.
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "merged")).eval()
    rows = sorted(read_jsonl(second.output_dir / "predictions.jsonl"), key=lambda r: r["idx"])
    eval_set = first.data.evals["validation"]
    order = np.argsort(eval_set.features["idx"])
    with torch.no_grad():
        logits = merged(input_ids=torch.as_tensor(eval_set.features["input_ids"][order].astype(np.int64)),
                        attention_mask=torch.as_tensor(eval_set.features["attention_mask"][order].astype(np.int64))).logits
    np.testing.assert_allclose(logits.numpy(), np.array([r["logits"] for r in rows]), atol=ATOL, rtol=1e-4)

    # An older checkpoint exports too, and differs from the final one.
    older = saved_run.export_checkpoint(second.output_dir, step=2, out_dir=str(tmp_path / "step2"), log=lambda _: None)
    at_step2 = safetensors.numpy.load_file(str(older / "adapter" / "adapter_model.safetensors"))
    assert any(not np.array_equal(at_step2[k], written[k]) for k in written if k in at_step2)
