"""SQuAD preprocessing: question first, context split into overlapping windows with offset mappings.

The "null" position (no answer in the window, and SQuAD v2's unanswerable questions) is token 0: the CLS
token for encoders; for decoder tokenizers without CLS it is simply the first token, used the same way in
training labels and in post-processing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from adapad_jax.runtime import progress
from adapad_jax.data.tasks import DataError

NULL_POSITION = 0
NOT_CONTEXT = -1  # offset value of tokens that are not part of the context
CHUNK_ROWS = 2048  # rows tokenised per call, to bound the memory of Python token lists


@dataclasses.dataclass
class QAEvalFeatures:
    """Validation windows plus what post-processing needs to map token spans back to context text."""

    arrays: dict[str, np.ndarray]  # input_ids, attention_mask [N, S] int32 (+ token_type_ids)
    example_index: np.ndarray  # [N] int64, row of the raw split each window comes from
    example_id: list[str]  # [N] the SQuAD id of that row
    offset_mapping: np.ndarray  # [N, S, 2] int32 character spans in the context, NOT_CONTEXT elsewhere

    def __len__(self) -> int:
        return len(self.example_id)


def _encode_chunks(
    dataset: Any, tokenizer: Any, max_length: int, doc_stride: int, chunk_rows: int, task_name: str = "squad"
) -> Iterator[tuple[Any, int]]:
    """Tokenise (question, context) pairs into windows, ``chunk_rows`` rows at a time; yields (encoding, first row).
    ``task_name`` names the task in the progress line."""
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise DataError("QA preprocessing needs tokenizer.padding_side == 'right' (use prepare_tokenizer)")
    if not 0 <= doc_stride < max_length:
        raise DataError(f"data.doc_stride ({doc_stride}) must be in [0, max_length={max_length})")
    if len(dataset) == 0:
        raise DataError("no SQuAD rows to tokenise")
    chunks = range(0, len(dataset), chunk_rows)
    for first in progress.iterate(chunks, len(chunks), f"tokenise {task_name} ({len(dataset)} rows)", unit="chunks"):
        rows = dataset[first : first + chunk_rows]
        questions = [q.lstrip() for q in rows["question"]]
        try:
            encoded = tokenizer(
                questions,
                list(rows["context"]),
                truncation="only_second",
                max_length=max_length,
                stride=doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                padding="max_length",
            )
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for too-long questions
            raise DataError(
                f"QA tokenisation failed with max_length={max_length}, doc_stride={doc_stride}: {err} "
                "(a question longer than the window, or a stride too large for it)"
            ) from None
        yield encoded, first


def model_arrays(encoded: Any, with_token_type_ids: bool) -> dict[str, np.ndarray]:
    """input_ids / attention_mask (/ token_type_ids) of a tokenizer output as int32 arrays."""
    arrays = {
        "input_ids": np.asarray(encoded["input_ids"], dtype=np.int32),
        "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
    }
    if with_token_type_ids and "token_type_ids" in encoded:
        arrays["token_type_ids"] = np.asarray(encoded["token_type_ids"], dtype=np.int32)
    return arrays


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        raise DataError("no rows to tokenise")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _context_span(sequence_ids: list[int | None]) -> tuple[int, int] | None:
    """First and last token index of the context (sequence 1) in one window; None for an empty context."""
    positions = [i for i, s in enumerate(sequence_ids) if s == 1]
    return (positions[0], positions[-1]) if positions else None


def prepare_qa_train_features(
    dataset: Any,
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    with_token_type_ids: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    task_name: str = "squad",
) -> dict[str, np.ndarray]:
    """Training windows with ``start_positions`` / ``end_positions`` (NULL_POSITION when the answer is outside)."""
    parts = []
    for encoded, first_row in _encode_chunks(dataset, tokenizer, max_length, doc_stride, chunk_rows, task_name):
        answers = dataset[first_row : first_row + chunk_rows]["answers"]
        starts, ends = [], []
        for window, offsets in enumerate(encoded["offset_mapping"]):
            answer = answers[encoded["overflow_to_sample_mapping"][window]]
            start, end = _answer_tokens(answer, offsets, encoded.sequence_ids(window))
            starts.append(start)
            ends.append(end)
        arrays = model_arrays(encoded, with_token_type_ids)
        arrays["start_positions"] = np.asarray(starts, dtype=np.int32)
        arrays["end_positions"] = np.asarray(ends, dtype=np.int32)
        parts.append(arrays)
    return _concat(parts)


def _answer_tokens(answer: dict, offsets: list, sequence_ids: list[int | None]) -> tuple[int, int]:
    """Token span of the first gold answer in one window, or (NULL_POSITION, NULL_POSITION)."""
    if not answer["answer_start"]:
        return NULL_POSITION, NULL_POSITION
    start_char = answer["answer_start"][0]
    end_char = start_char + len(answer["text"][0])
    span = _context_span(sequence_ids)
    if span is None:
        return NULL_POSITION, NULL_POSITION
    first, last = span
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return NULL_POSITION, NULL_POSITION
    # First context token ending after the answer start; last context token starting before its end.
    start_token = first
    while start_token <= last and offsets[start_token][1] <= start_char:
        start_token += 1
    end_token = last
    while end_token >= first and offsets[end_token][0] >= end_char:
        end_token -= 1
    return start_token, end_token


def prepare_qa_eval_features(
    dataset: Any,
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    with_token_type_ids: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    task_name: str = "squad",
) -> QAEvalFeatures:
    """Validation windows keeping the example id and context offsets of every token."""
    ids = dataset["id"]
    parts, example_index, offset_parts = [], [], []
    for encoded, first_row in _encode_chunks(dataset, tokenizer, max_length, doc_stride, chunk_rows, task_name):
        sample_of_window = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64) + first_row
        offsets = np.full((len(sample_of_window), max_length, 2), NOT_CONTEXT, dtype=np.int32)
        for window, window_offsets in enumerate(encoded["offset_mapping"]):
            for token, (span, sequence) in enumerate(zip(window_offsets, encoded.sequence_ids(window))):
                if sequence == 1:
                    offsets[window, token] = span
        parts.append(model_arrays(encoded, with_token_type_ids))
        example_index.append(sample_of_window)
        offset_parts.append(offsets)
    example_index = np.concatenate(example_index)
    return QAEvalFeatures(
        arrays=_concat(parts),
        example_index=example_index,
        example_id=[str(ids[i]) for i in example_index],
        offset_mapping=np.concatenate(offset_parts),
    )
