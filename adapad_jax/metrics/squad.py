"""SQuAD v1.1 and v2.0 exact match / F1 with the official answer normalisation.

Semantics follow the official evaluation scripts: answers are lower-cased, stripped of punctuation,
of the articles a/an/the and of extra whitespace; a prediction scores the max over the gold answers;
results are percentages. v2: a question whose gold answer list is empty is unanswerable (gold = "");
an F1 against an empty answer is 1 only when both are empty; HasAns_/NoAns_ break the scores down.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (official SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, empty_matches_empty: bool = True) -> float:
    """Token-level F1 of the normalised answers.

    ``empty_matches_empty`` (v2 script): if either side normalises to no tokens, F1 is 1 when both do, else 0.
    The v1.1 script instead scores any empty side as 0.
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_matches_empty and (not prediction_tokens or not gold_tokens):
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(answers) -> list[str]:
    return list(answers["text"]) if isinstance(answers, Mapping) else list(answers)


def squad_v1_metrics(predictions: Mapping[str, str], references: Mapping[str, object]) -> dict[str, float]:
    """``exact_match`` and ``f1`` (percent) over the reference ids; references map id -> answers (or texts)."""
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question id(s) have no prediction, e.g. {missing[0]!r}")
    exact, f1 = 0.0, 0.0
    for qid, answers in references.items():
        golds = _gold_texts(answers)
        if not golds:
            raise ValueError(f"SQuAD v1.1 question {qid!r} has no gold answer")
        exact += max(exact_match_score(predictions[qid], g) for g in golds)
        f1 += max(f1_score(predictions[qid], g, empty_matches_empty=False) for g in golds)
    total = len(references)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def _best_threshold(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    no_answer_probability: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """Official v2 'best_*' search: the no-answer threshold that maximises the score.

    Start from "every question predicted unanswerable" and admit answers in order of rising no-answer
    probability: an answerable question gains its score, an unanswerable one loses its point if the
    admitted prediction is a non-empty string.
    """
    current = best = float(sum(1 for qid in scores if not has_answer[qid]))
    best_threshold = 0.0
    for qid in sorted(scores, key=lambda q: no_answer_probability[q]):
        if has_answer[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1.0
        if current > best:
            best, best_threshold = current, float(no_answer_probability[qid])
    return 100.0 * best / len(scores), best_threshold


def squad_v2_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, object],
    no_answer_probability: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Official v2 ``exact``, ``f1``, ``total`` and the ``HasAns_*`` / ``NoAns_*`` breakdowns (percent).

    With ``no_answer_probability`` also ``best_exact``/``best_f1`` and their thresholds (official script).
    """
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question id(s) have no prediction, e.g. {missing[0]!r}")
    exact_scores, f1_scores, has_answer = {}, {}, {}
    for qid, answers in references.items():
        raw_golds = _gold_texts(answers)
        has_answer[qid] = bool(raw_golds)
        golds = [g for g in raw_golds if normalize_answer(g)] or [""]
        exact_scores[qid] = max(exact_match_score(predictions[qid], g) for g in golds)
        f1_scores[qid] = max(f1_score(predictions[qid], g) for g in golds)

    def mean(scores: Mapping[str, float], ids: Sequence[str]) -> float:
        return 100.0 * sum(scores[q] for q in ids) / len(ids)

    all_ids = list(references)
    result: dict[str, float] = {
        "exact": mean(exact_scores, all_ids),
        "f1": mean(f1_scores, all_ids),
        "total": float(len(all_ids)),
    }
    answerable = [q for q in all_ids if has_answer[q]]
    unanswerable = [q for q in all_ids if not has_answer[q]]
    for prefix, ids in (("HasAns", answerable), ("NoAns", unanswerable)):
        if ids:
            result[f"{prefix}_exact"] = mean(exact_scores, ids)
            result[f"{prefix}_f1"] = mean(f1_scores, ids)
            result[f"{prefix}_total"] = float(len(ids))
    if no_answer_probability is not None:
        for name, scores in (("exact", exact_scores), ("f1", f1_scores)):
            best, threshold = _best_threshold(predictions, scores, no_answer_probability, has_answer)
            result[f"best_{name}"], result[f"best_{name}_thresh"] = best, threshold
    return result
