"""Span logits over context windows -> answer text per question (SQuAD v1 and v2)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from adapad_jax.data.squad import NOT_CONTEXT, NULL_POSITION


@dataclasses.dataclass
class QAPredictions:
    """Answer text per question id, and for v2 the no-answer probability and score difference."""

    text: dict[str, str]
    no_answer_probability: dict[str, float]
    null_score_diff: dict[str, float]  # null score - best span score (v2 predicts "" when > threshold)


def _offsets_as_array(offsets, window_count: int) -> list[np.ndarray]:
    """Accept [N, S, 2] arrays with NOT_CONTEXT, or HF-style nested lists with None for non-context tokens."""
    if isinstance(offsets, np.ndarray):
        return list(offsets)
    converted = []
    for window in offsets:
        converted.append(
            np.asarray([(NOT_CONTEXT, NOT_CONTEXT) if span is None else span for span in window], dtype=np.int64)
        )
    if len(converted) != window_count:
        raise ValueError(f"{len(converted)} offset rows for {window_count} windows")
    return converted


def postprocess_qa_predictions(
    example_ids: Sequence[str],
    contexts: Sequence[str],
    feature_example_index: np.ndarray,
    offset_mapping,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    version_2: bool,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
) -> QAPredictions:
    """Pick each question's best span over its windows.

    Candidates are the ``n_best`` top start and end tokens of every window that lie in the context,
    with start <= end and at most ``max_answer_length`` tokens; a span scores start + end logit.
    v2: the null score is the smallest start[0] + end[0] over the question's windows; the answer is ""
    when null score - best span score > ``null_threshold``. ``no_answer_probability`` is the sigmoid of
    that difference (monotone in it, so the official best-threshold search works on it).
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    feature_example_index = np.asarray(feature_example_index)
    windows_count = len(feature_example_index)
    if start_logits.shape != end_logits.shape or start_logits.shape[0] != windows_count:
        raise ValueError(
            f"logits {start_logits.shape}/{end_logits.shape} do not match {windows_count} feature windows"
        )
    offsets = _offsets_as_array(offset_mapping, windows_count)
    windows_of_example = collections.defaultdict(list)
    for window, example in enumerate(feature_example_index):
        windows_of_example[int(example)].append(window)

    text, no_answer_probability, null_score_diff = {}, {}, {}
    for example, qid in enumerate(example_ids):
        context = contexts[example]
        best_score, best_text = -np.inf, ""
        null_score = np.inf
        for window in windows_of_example.get(example, []):
            starts, ends, window_offsets = start_logits[window], end_logits[window], offsets[window]
            null_score = min(null_score, float(starts[NULL_POSITION] + ends[NULL_POSITION]))
            top_starts = np.argsort(starts)[::-1][:n_best]
            top_ends = np.argsort(ends)[::-1][:n_best]
            for s in top_starts:
                if window_offsets[s][0] == NOT_CONTEXT:
                    continue
                for e in top_ends:
                    if e < s or e - s + 1 > max_answer_length or window_offsets[e][0] == NOT_CONTEXT:
                        continue
                    score = float(starts[s] + ends[e])
                    if score > best_score:
                        best_score = score
                        best_text = context[window_offsets[s][0] : window_offsets[e][1]].strip()
        if not version_2:
            text[qid] = best_text
            continue
        diff = null_score - best_score  # +inf when no valid span exists
        null_score_diff[qid] = float(diff)
        no_answer_probability[qid] = float(1.0 / (1.0 + np.exp(-np.clip(diff, -60.0, 60.0))))
        text[qid] = "" if diff > null_threshold else best_text
    return QAPredictions(text=text, no_answer_probability=no_answer_probability, null_score_diff=null_score_diff)
