"""Tiny stand-ins round-trip through transformers (AutoTokenizer / AutoModel) and the data validators."""

import json

import numpy as np
import pytest
from reference_libs import import_reference

torch = import_reference("torch")
import transformers
from safetensors.numpy import load_file

from adapad_jax.data import get_task, validate_data_files
from adapad_jax.testing.tiny import (
    build_tiny_deberta,
    build_tiny_qwen3,
    train_sentencepiece_tokenizer,
    write_tiny_glue,
    write_tiny_squad,
)

GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")


def test_sentencepiece_tokenizer_is_deberta_style_and_quiet(tmp_path, capfd):
    tokenizer = train_sentencepiece_tokenizer(tmp_path, vocab_size=300)
    captured = capfd.readouterr()
    assert len(captured.out) + len(captured.err) < 200, "sentencepiece training must not flood the logs"
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert [reloaded.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")] == [0, 1, 2, 3]
    assert reloaded.mask_token == "[MASK]" and reloaded.unk_token_id == 3
    ids = reloaded("The color of Alice is red.", "What is it?")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(2) == 2
    assert reloaded.decode(ids, skip_special_tokens=True).replace(" ", "") == "ThecolorofAliceisred.Whatisit?"
    assert ids == tokenizer("The color of Alice is red.", "What is it?")["input_ids"]


@pytest.mark.parametrize("task,auto_class,num_labels", [
    ("classification", transformers.AutoModelForSequenceClassification, 3),
    ("regression", transformers.AutoModelForSequenceClassification, 1),
    ("qa", transformers.AutoModelForQuestionAnswering, 2),
])
def test_tiny_deberta_round_trip(tmp_path, task, auto_class, num_labels):
    directory = build_tiny_deberta(tmp_path, task, num_labels=3, vocab_size=300, seed=1)
    assert (directory / "model.safetensors").exists() and (directory / "spm.model").exists()
    config = transformers.AutoConfig.from_pretrained(str(directory))
    assert config.model_type == "deberta-v2" and config.num_labels == num_labels and config.hidden_size == 32
    assert config.position_biased_input is False and config.type_vocab_size == 0
    model, info = auto_class.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    inputs = tokenizer(["The river was good .", "What is the pet of Uma?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    if task == "qa":
        assert out.start_logits.shape == inputs["input_ids"].shape
    else:
        assert out.logits.shape == (2, num_labels)
        assert (config.problem_type == "regression") == (task == "regression")


def test_tiny_qwen3_round_trip_with_padding(tmp_path):
    directory = build_tiny_qwen3(tmp_path / "qa", "qa", vocab_size=300, seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    config = transformers.AutoConfig.from_pretrained(str(directory))
    assert config.model_type == "qwen3" and config.num_key_value_heads == 2 and config.tie_word_embeddings
    assert config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.cls_token is None
    model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    classifier_dir = build_tiny_qwen3(tmp_path / "cls", "classification", num_labels=3, vocab_size=300, seed=0)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(str(classifier_dir))
    inputs = tokenizer(["a short one", "a much longer sentence than the first"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = classifier(**inputs).logits
        alone = classifier(**tokenizer(["a short one"], return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-4, atol=1e-5)  # right padding does not change row 0


def test_builders_are_seeded(tmp_path):
    a = load_file(str(build_tiny_qwen3(tmp_path / "a", "lm", vocab_size=300, seed=3) / "model.safetensors"))
    b = load_file(str(build_tiny_qwen3(tmp_path / "b", "lm", vocab_size=300, seed=3) / "model.safetensors"))
    c = load_file(str(build_tiny_qwen3(tmp_path / "c", "lm", vocab_size=300, seed=4) / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="task must be one of"):
        build_tiny_qwen3(tmp_path / "d", "seq2seq")
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        build_tiny_qwen3(tmp_path / "e", "qa", vocab_size=100)


@pytest.mark.parametrize("task", GLUE)
def test_tiny_glue_files_have_the_real_schema(tmp_path, task):
    spec = get_task(task)
    files = write_tiny_glue(tmp_path, task, n_train=40, n_val=10, seed=2)
    validate_data_files(task, files.train_file, files.validation_file)
    assert len(files.validation_file.split(",")) == len(spec.validation_splits)
    rows = [json.loads(line) for line in open(files.train_file)]
    assert len(rows) == 40 and [r["idx"] for r in rows] == list(range(40))
    assert set(rows[0]) == set(spec.text_columns) | {"label", "idx"}
    labels = {r["label"] for r in rows}
    assert len(labels) == (3 if task == "stsb" else spec.num_labels), "every class should appear"


@pytest.mark.parametrize("version", [1, 2])
def test_tiny_squad_answers_point_into_the_context(tmp_path, version):
    files = write_tiny_squad(tmp_path, version=version, n_train=30, n_val=10)
    task = "squad" if version == 1 else "squad_v2"
    validate_data_files(task, files.train_file, files.validation_file)
    rows = [json.loads(line) for path in (files.train_file, files.validation_file) for line in open(path)]
    assert len({r["id"] for r in rows}) == 40
    unanswerable = 0
    for row in rows:
        unanswerable += not row["answers"]["text"]
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text
    assert (unanswerable > 0) == (version == 2)
    assert max(len(r["context"]) for r in rows) > 400, "some contexts must be long enough for several windows"
