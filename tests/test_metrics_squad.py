"""SQuAD normalisation, EM/F1 (official semantics), v2 breakdowns, QA post-processing and evaluation rows."""

import math

import numpy as np
import pytest

from adapad_jax.metrics import compute_metrics, normalize_answer, postprocess_qa_predictions
from adapad_jax.metrics.squad import exact_match_score, f1_score


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theater") == "theater"  # articles only as whole words
    assert normalize_answer("A.B.C") == "abc"
    assert normalize_answer("  \tthe\n") == ""


def test_exact_match_and_f1():
    assert exact_match_score("The Denver Broncos", "denver broncos") == 1.0
    assert f1_score("the cat sat on mat", "a cat sat on the mat") == 1.0
    assert f1_score("cat sat", "cat sat on mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert f1_score("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset overlap
    assert f1_score("dog", "cat") == 0.0
    # both normalise to empty: v2 scores 1, v1 scores 0
    assert f1_score("the", "a") == 1.0
    assert f1_score("the", "a", empty_matches_empty=False) == 0.0
    assert f1_score("", "cat") == 0.0


def test_squad_v1_max_over_gold_answers():
    predictions = {"q1": "Denver Broncos", "q2": "in 1990"}
    references = {
        "q1": {"text": ["Denver Broncos", "The Denver Broncos"], "answer_start": [0, 0]},
        "q2": {"text": ["1990", "the year 1990"], "answer_start": [3, 0]},
    }
    result = compute_metrics("squad", predictions, references)
    # q2: F1 vs "1990" = 2*.5*1/1.5 = 2/3; vs "year 1990" = 1/2 -> max 2/3
    assert result == pytest.approx({"exact_match": 50.0, "f1": 100 * (1 + 2 / 3) / 2})
    with pytest.raises(ValueError, match="no prediction"):
        compute_metrics("squad", {"q1": "x"}, references)


def _v2_case():
    predictions = {"q1": "blue", "q2": "", "q3": "red", "q4": "car"}
    references = {
        "q1": {"text": ["blue"], "answer_start": [0]},
        "q2": {"text": [], "answer_start": []},
        "q3": {"text": [], "answer_start": []},
        "q4": {"text": ["the red car"], "answer_start": [0]},
    }
    return predictions, references


def test_squad_v2_overall_and_breakdowns():
    predictions, references = _v2_case()
    result = compute_metrics("squad_v2", predictions, references)
    # EM per q: 1, 1, 0, 0; F1 per q: 1, 1, 0, 2/3 (pred {car} vs gold {red, car})
    assert result["exact"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (2 + 2 / 3) / 4)
    assert result["total"] == 4
    assert result["HasAns_exact"] == pytest.approx(50.0)
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result["HasAns_total"] == 2 and result["NoAns_total"] == 2
    assert result["NoAns_exact"] == pytest.approx(50.0) and result["NoAns_f1"] == pytest.approx(50.0)
    assert "best_f1" not in result


def test_squad_v2_best_threshold_official_semantics():
    predictions, references = _v2_case()
    no_answer = {"q1": 0.1, "q2": 0.9, "q3": 0.8, "q4": 0.3}
    result = compute_metrics("squad_v2", predictions, references, no_answer)
    # start at 2 (both unanswerable right); admit q1 +1 (=3 @0.1), q4 +0 / +2/3, q3 -1, q2 0
    assert result["best_exact"] == pytest.approx(75.0) and result["best_exact_thresh"] == pytest.approx(0.1)
    assert result["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4) and result["best_f1_thresh"] == pytest.approx(0.3)


def test_squad_v2_gold_that_normalises_to_empty_counts_as_answerable():
    result = compute_metrics("squad_v2", {"q": ""}, {"q": {"text": ["the"], "answer_start": [0]}})
    assert result["HasAns_total"] == 1 and result["exact"] == 100.0


# ---- post-processing on hand-built logits ------------------------------------------------------------

CONTEXT = "abc def ghi jkl"
# tokens: 0 = CLS, 1 = question, 2..5 = context words, 6 = padding
OFFSETS = np.array([[-1, -1], [-1, -1], [0, 3], [4, 7], [8, 11], [12, 15], [-1, -1]])


def _logits(peaks: dict[int, float]) -> np.ndarray:
    row = np.zeros(7)
    for index, value in peaks.items():
        row[index] = value
    return row


def _run(start, end, version_2=False, **kw):
    return postprocess_qa_predictions(
        ["q"], [CONTEXT], np.array([0]), OFFSETS[None], start[None], end[None], version_2=version_2, **kw
    )


def test_postprocess_picks_best_span_skipping_question_tokens_and_reversed_spans():
    # question token 1 has the highest start logit but is not context; end 2 < start 3 is invalid
    start = _logits({1: 9.0, 3: 5.0, 2: 1.0})
    end = _logits({2: 7.0, 4: 4.0})
    # valid: (3,4) = 9, (2,2) = 8, (2,4) = 5; (1,*) is the question, (3,2) is reversed
    assert _run(start, end).text == {"q": "def ghi"}


def test_postprocess_respects_max_answer_length():
    start = _logits({2: 5.0, 4: 1.0})
    end = _logits({5: 5.0, 4: 3.0})
    assert _run(start, end).text["q"] == "abc def ghi jkl"  # 4 tokens, score 10
    # at most 2 tokens: (4,5)=1+5=6, (4,4)=1+3=4, (2,*) too long -> "ghi jkl"
    assert _run(start, end, max_answer_length=2).text["q"] == "ghi jkl"


def test_postprocess_v2_null_threshold():
    start = _logits({0: 6.0, 3: 5.0})
    end = _logits({0: 4.0, 4: 4.0})
    # null = 6 + 4 = 10, best span (3,4) = 9: diff 1
    result = _run(start, end, version_2=True)
    assert result.text["q"] == ""
    assert result.null_score_diff["q"] == pytest.approx(1.0)
    assert result.no_answer_probability["q"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert _run(start, end, version_2=True, null_threshold=1.5).text["q"] == "def ghi"
    # v1 ignores the null score
    assert _run(start, end).text["q"] == "def ghi"


def test_postprocess_over_several_windows_and_hf_style_offsets():
    # example 0 has two windows, the answer is in the second; example 1 has one window
    offsets_hf = [
        [None, None, (0, 3), (4, 7), None, None, None],
        [None, None, (8, 11), (12, 15), None, None, None],
        [None, None, (0, 3), (4, 7), (8, 11), (12, 15), None],
    ]
    start = np.stack([_logits({0: 1.0, 2: 2.0}), _logits({0: 3.0, 3: 6.0}), _logits({5: 1.0})])
    end = np.stack([_logits({0: 1.0, 3: 2.0}), _logits({0: 0.0, 3: 5.0}), _logits({5: 1.0})])
    result = postprocess_qa_predictions(
        ["a", "b"], [CONTEXT, CONTEXT], np.array([0, 0, 1]), offsets_hf, start, end, version_2=True
    )
    assert result.text == {"a": "jkl", "b": "jkl"}
    # null score of "a" is the min over its windows: min(1+1, 3+0) = 2; best span 11 -> diff -9
    assert result.null_score_diff["a"] == pytest.approx(2.0 - 11.0)
