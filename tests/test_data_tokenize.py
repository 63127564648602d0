"""GLUE tokenisation and canonical QA preprocessing with both tokenizer kinds (SentencePiece and byte-level BPE)."""

import json

import numpy as np
import pytest

from adapad_jax.data import (
    DataError,
    build_task_data,
    build_task_data_from_config,
    get_task,
    load_raw_splits,
    load_tokenizer,
    prepare_qa_eval_features,
    prepare_qa_train_features,
    prepare_tokenizer,
    tokenize_glue,
)
from adapad_jax.data.squad import NOT_CONTEXT
from adapad_jax.testing.tiny import (
    train_bpe_tokenizer,
    train_sentencepiece_tokenizer,
    write_tiny_glue,
    write_tiny_squad,
)

MAX_LENGTH, STRIDE = 48, 12


@pytest.fixture(scope="module", params=["sentencepiece", "bpe"])
def tokenizer(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    (train_sentencepiece_tokenizer if request.param == "sentencepiece" else train_bpe_tokenizer)(directory)
    return load_tokenizer(str(directory))


@pytest.fixture(scope="module")
def squad_v2_files(tmp_path_factory):
    return write_tiny_squad(tmp_path_factory.mktemp("squad"), version=2, n_train=16, n_val=8, max_facts=14)


def test_prepare_tokenizer_sets_right_padding_and_eos_as_pad(tmp_path):
    train_bpe_tokenizer(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    prepare_tokenizer(tokenizer)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "absent"))


def test_glue_pairs_match_the_tokenizer_row_by_row(tokenizer, tmp_path):
    files = write_tiny_glue(tmp_path, "stsb", n_train=6, n_val=2)
    spec = get_task("glue_stsb")
    raw = load_raw_splits(spec, train_file=files.train_file)["train"]
    features = tokenize_glue(raw, spec, tokenizer, max_length=12)
    rows = [json.loads(line) for line in open(files.train_file)]
    assert features["input_ids"].shape == (6, 12) and features["input_ids"].dtype == np.int32
    assert features["labels"].dtype == np.float32
    np.testing.assert_allclose(features["labels"], [r["label"] for r in rows])
    np.testing.assert_array_equal(features["idx"], [r["idx"] for r in rows])
    for i, row in enumerate(rows):
        expected = tokenizer(row["sentence1"], row["sentence2"], truncation=True, max_length=12)["input_ids"]
        padded = expected + [tokenizer.pad_token_id] * (12 - len(expected))
        assert features["input_ids"][i].tolist() == padded
        assert features["attention_mask"][i].tolist() == [1] * len(expected) + [0] * (12 - len(expected))


def _answer_inside(offsets, start_char, end_char):
    context = offsets[:, 0] != NOT_CONTEXT
    return context.any() and offsets[context, 0].min() <= start_char and offsets[context, 1].max() >= end_char


def test_qa_train_windows_label_the_answer_tokens(tokenizer, squad_v2_files):
    raw = load_raw_splits("squad_v2", train_file=squad_v2_files.train_file)["train"]
    train = prepare_qa_train_features(raw, tokenizer, MAX_LENGTH, STRIDE)
    windows = prepare_qa_eval_features(raw, tokenizer, MAX_LENGTH, STRIDE)  # same windows, with offsets
    assert len(windows) == len(train["input_ids"]) > len(raw), "long contexts must give several windows"
    np.testing.assert_array_equal(windows.arrays["input_ids"], train["input_ids"])
    labelled = 0
    for w in range(len(windows)):
        row = raw[int(windows.example_index[w])]
        start, end = int(train["start_positions"][w]), int(train["end_positions"][w])
        if not row["answers"]["text"]:
            assert start == end == 0
            continue
        answer, start_char = row["answers"]["text"][0], row["answers"]["answer_start"][0]
        if not _answer_inside(windows.offset_mapping[w], start_char, start_char + len(answer)):
            assert start == end == 0
            continue
        labelled += 1
        assert 0 < start <= end
        assert tokenizer.decode(train["input_ids"][w][start : end + 1]).strip() == answer
    assert labelled >= len([r for r in raw if r["answers"]["text"]])


def test_qa_windows_question_first_stride_overlap_and_right_padding(tokenizer, squad_v2_files):
    raw = load_raw_splits("squad_v2", validation_file=squad_v2_files.validation_file)["validation"]
    features = prepare_qa_eval_features(raw, tokenizer, MAX_LENGTH, STRIDE)
    mask = features.arrays["attention_mask"]
    assert (np.diff(mask, axis=1) <= 0).all(), "padding must be on the right"
    for w in range(len(features)):
        example = int(features.example_index[w])
        question = raw[example]["question"]
        assert features.example_id[w] == raw[example]["id"]
        assert tokenizer.decode(features.arrays["input_ids"][w][:6], skip_special_tokens=True).strip() != ""
        stripped_ids = tokenizer(question.lstrip(), add_special_tokens=False)["input_ids"]
        window_ids = features.arrays["input_ids"][w].tolist()
        assert any(window_ids[i : i + len(stripped_ids)] == stripped_ids for i in range(3)), "question comes first"
        offsets = features.offset_mapping[w]
        for token in np.flatnonzero(offsets[:, 0] != NOT_CONTEXT):
            piece = raw[example]["context"][offsets[token, 0] : offsets[token, 1]]
            assert piece.strip() == tokenizer.decode([window_ids[token]]).strip()
        if w + 1 < len(features) and features.example_index[w + 1] == example:
            context_now = offsets[offsets[:, 0] != NOT_CONTEXT]
            context_next = features.offset_mapping[w + 1][features.offset_mapping[w + 1][:, 0] != NOT_CONTEXT]
            np.testing.assert_array_equal(context_next[:STRIDE], context_now[-STRIDE:])


def test_qa_stride_must_fit(tokenizer, squad_v2_files):
    raw = load_raw_splits("squad_v2", validation_file=squad_v2_files.validation_file)["validation"]
    with pytest.raises(DataError, match="doc_stride"):
        prepare_qa_eval_features(raw, tokenizer, 32, 40)


def test_build_task_data_for_mnli_has_both_validation_splits(tokenizer, tmp_path):
    files = write_tiny_glue(tmp_path, "mnli", n_train=8, n_val=4)
    data = build_task_data("glue_mnli", tokenizer, train_file=files.train_file, validation_file=files.validation_file)
    assert list(data.evals) == ["validation_matched", "validation_mismatched"]
    assert data.train["input_ids"].shape == (8, 128) and data.max_length == 128
    assert data.evals["validation_mismatched"].num_features == 4


def test_chunked_tokenisation_equals_one_pass(tokenizer, squad_v2_files, tmp_path):
    raw = load_raw_splits("squad_v2", train_file=squad_v2_files.train_file)["train"]
    whole = prepare_qa_train_features(raw, tokenizer, MAX_LENGTH, STRIDE, chunk_rows=10_000)
    chunked = prepare_qa_train_features(raw, tokenizer, MAX_LENGTH, STRIDE, chunk_rows=3)
    assert whole.keys() == chunked.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], chunked[key])
    eval_whole = prepare_qa_eval_features(raw, tokenizer, MAX_LENGTH, STRIDE, chunk_rows=10_000)
    eval_chunked = prepare_qa_eval_features(raw, tokenizer, MAX_LENGTH, STRIDE, chunk_rows=5)
    np.testing.assert_array_equal(eval_whole.example_index, eval_chunked.example_index)
    np.testing.assert_array_equal(eval_whole.offset_mapping, eval_chunked.offset_mapping)
    assert eval_whole.example_id == eval_chunked.example_id
    files = write_tiny_glue(tmp_path, "rte", n_train=7, n_val=2)
    spec = get_task("rte")
    glue_raw = load_raw_splits(spec, train_file=files.train_file)["train"]
    a, b = tokenize_glue(glue_raw, spec, tokenizer, 16), tokenize_glue(glue_raw, spec, tokenizer, 16, chunk_rows=2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_build_task_data_from_config(tokenizer, tmp_path):
    import ml_collections

    files = write_tiny_squad(tmp_path, version=1, n_train=6, n_val=3, max_facts=10)
    config = ml_collections.ConfigDict({"task": "squad", "data": {
        "source": "auto", "train_file": files.train_file, "validation_file": files.validation_file,
        "max_length": 40, "doc_stride": 10, "max_train_examples": 4, "max_eval_examples": 0}})
    data = build_task_data_from_config(config, tokenizer)
    assert data.max_length == 40 and data.train["input_ids"].shape[1] == 40
    assert len(data.evals["validation"].examples) == 3
    first_four = load_raw_splits("squad", train_file=files.train_file, max_train_examples=4)["train"]
    reference = prepare_qa_train_features(first_four, tokenizer, 40, 10)
    np.testing.assert_array_equal(data.train["start_positions"], reference["start_positions"])
