"""Tiny offline stand-ins: tokenizers trained on the spot, random checkpoints, small datasets in the real schema.

Nothing here touches the network. The synthetic GLUE and SQuAD rows are generated from small word lists
with labels that follow simple rules, so a model can learn them; the same word lists feed the tokenizer
training corpus, so the tiny tokenizers cover the datasets' words.
Over 400 lines because the stand-ins share their word lists and tokenizer corpus; they are test scaffolding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from adapad_jax.data.tasks import DataError, get_task

# --------------------------------------------------------------------------------------------------------
# Word lists and sentence generators.

NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Gus", "Hana", "Ivan", "Jule", "Kofi", "Lena",
         "Mateo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara")
NOUNS = ("river", "castle", "garden", "market", "bridge", "forest", "harbor", "library", "tower", "valley",
         "station", "village", "museum", "island", "meadow", "temple")
POSITIVE = ("good", "great", "lovely", "bright", "happy", "charming", "superb", "pleasant")
NEGATIVE = ("bad", "awful", "dull", "sad", "broken", "gloomy", "terrible", "boring")
VERBS = ("visited", "painted", "described", "photographed", "admired", "crossed", "explored", "mapped")
ATTRIBUTES = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "silver", "black"),
    "city": ("Paris", "Lagos", "Lima", "Oslo", "Delhi", "Quito", "Seoul", "Cairo"),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "pony"),
    "year": ("1990", "1984", "2001", "1875", "1969", "2012", "1756", "1933"),
    "instrument": ("violin", "piano", "flute", "drum", "cello", "guitar", "harp", "trumpet"),
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _statement(rng: np.random.Generator, name: str | None = None, noun: str | None = None) -> tuple[str, str, str]:
    name, noun = name or _pick(rng, NAMES), noun or _pick(rng, NOUNS)
    return f"{name} {_pick(rng, VERBS)} the old {noun} near the {_pick(rng, NOUNS)}.", name, noun


def tiny_corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Lines covering every word the tiny datasets use (tokenizer training text)."""
    rng = np.random.default_rng(seed)
    words = list(NAMES + NOUNS + POSITIVE + NEGATIVE + VERBS)
    for attribute, values in ATTRIBUTES.items():
        words += [attribute, *values]
    lines = [" ".join(words)]
    while len(lines) < num_lines:
        kind = len(lines) % 4
        if kind == 0:
            lines.append(_statement(rng)[0])
        elif kind == 1:
            good, bad = _pick(rng, POSITIVE), _pick(rng, NEGATIVE)
            lines.append(f"The {_pick(rng, NOUNS)} was {good} but the {_pick(rng, NOUNS)} was {bad}.")
        elif kind == 2:
            attribute = _pick(rng, tuple(ATTRIBUTES))
            name = _pick(rng, NAMES)
            value = _pick(rng, ATTRIBUTES[attribute])
            lines.append(f"What is the {attribute} of {name}? The {attribute} of {name} is {value}.")
        else:
            name, noun, other = _pick(rng, NAMES), _pick(rng, NOUNS), _pick(rng, NOUNS)
            lines.append(f"Did {name} not see the {noun}? Which {other} does it have?")
    return lines


# --------------------------------------------------------------------------------------------------------
# Tokenizers.

# Qwen2/Qwen3 pre-tokenisation pattern (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_sentencepiece_tokenizer(
    directory: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 400
) -> Any:
    """Train a DeBERTa-style SentencePiece unigram tokenizer into ``directory`` and load it with AutoTokenizer.

    Pieces: pad=0 [PAD], bos=1 [CLS], eos=2 [SEP], unk=3 [UNK], user symbol [MASK]. Writes ``spm.model`` and a
    ``config.json`` with ``model_type: deberta-v2``, then saves the loaded tokenizer (``tokenizer.json`` etc.).
    """
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts) if texts is not None else tiny_corpus()),
            model_writer=model,
            logstream=quiet,
            minloglevel=2,  # warnings and up only; the C++ trainer logs every EM round otherwise
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            pad_piece="[PAD]",
            bos_id=1,
            bos_piece="[CLS]",
            eos_id=2,
            eos_piece="[SEP]",
            unk_id=3,
            unk_piece="[UNK]",
            user_defined_symbols=["[MASK]"],
            num_threads=1,
        )
    (directory / "spm.model").write_bytes(model.getvalue())
    config_path = directory / "config.json"
    if not config_path.exists():
        config_path.write_text(json.dumps({"model_type": "deberta-v2"}))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def train_bpe_tokenizer(
    directory: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 400
) -> Any:
    """Train a Qwen-like byte-level BPE (Qwen split regex) into ``directory``; eos <|im_end|>, pad <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(QWEN_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"a byte-level BPE needs vocab_size >= {minimum} (256 bytes + special tokens), got {vocab_size}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts) if texts is not None else tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


# --------------------------------------------------------------------------------------------------------
# Random checkpoints.


def _save_quietly(model: Any, directory: Path) -> None:
    """save_pretrained as safetensors without the shard-writing progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_model_task(task: str, num_labels: int) -> int:
    from adapad_jax.models.base import MODEL_TASKS

    if task not in MODEL_TASKS:
        raise ValueError(f"task must be one of {MODEL_TASKS}, got '{task}'")
    if task == "regression":
        return 1
    if task == "qa":
        return 2
    return num_labels


def tiny_deberta_config(**overrides: Any) -> Any:
    """A DeBERTaV3-architecture ``DebertaV2Config``: hidden 32, 2 layers, 4 heads, unless ``overrides`` say otherwise.

    Relative attention with shared keys, p2c|c2p, no absolute positions or token types, as in DeBERTaV3-base.
    """
    import transformers

    settings: dict[str, Any] = dict(
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=16,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        num_labels=2,
    )
    settings.update(overrides)
    return transformers.DebertaV2Config(**settings)


def tiny_qwen3_config(**overrides: Any) -> Any:
    """A ``Qwen3Config``: hidden 32, 2 layers, 4 query heads, 2 key/value heads of dim 8, tied embeddings.

    ``overrides`` replace any of these settings (``pad_token_id=None``: no pad id, like Qwen/Qwen3-0.6B).
    """
    import transformers

    settings: dict[str, Any] = dict(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        num_labels=2,
    )
    settings.update(overrides)
    return transformers.Qwen3Config(**settings)


def _save_random_model(family: str, task: str, config: Any, seed: int, directory: Path) -> Path:
    """Instantiate the task's transformers class for ``family`` with seeded random weights and save it."""
    import torch
    import transformers

    prefix = {"deberta": "DebertaV2", "qwen3": "Qwen3"}[family]
    suffix = {
        "classification": "ForSequenceClassification",
        "regression": "ForSequenceClassification",
        "qa": "ForQuestionAnswering",
        "lm": "ForMaskedLM" if family == "deberta" else "ForCausalLM",
    }[task]
    torch.manual_seed(seed)
    _save_quietly(getattr(transformers, prefix + suffix)(config).eval(), directory)
    return directory


def _settings(task: str, tokenizer: Any, vocab_size: int, num_labels: int, **config_overrides: Any) -> dict:
    """Config settings from the tokenizer and the task (regression's problem type), then the caller's overrides."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels
    )
    if task == "regression":
        settings["problem_type"] = "regression"
    return {**settings, **config_overrides}


def build_tiny_deberta(
    directory: str | os.PathLike,
    task: str = "classification",
    num_labels: int = 2,
    vocab_size: int = 400,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    **config_overrides: Any,
) -> Path:
    """Save a random DeBERTaV3-architecture checkpoint (safetensors) and its SentencePiece tokenizer in ``directory``.

    ``task``: "classification" / "regression" (DebertaV2ForSequenceClassification), "qa"
    (DebertaV2ForQuestionAnswering) or "lm" (DebertaV2ForMaskedLM). Size: hidden 32, 2 layers, 4 heads,
    unless ``config_overrides`` say otherwise (see ``tiny_deberta_config``).
    """
    num_labels = _check_model_task(task, num_labels)
    directory = Path(directory)
    tokenizer = train_sentencepiece_tokenizer(directory, texts, vocab_size)
    config = tiny_deberta_config(**_settings(task, tokenizer, vocab_size, num_labels, **config_overrides))
    return _save_random_model("deberta", task, config, seed, directory)


def build_tiny_qwen3(
    directory: str | os.PathLike,
    task: str = "qa",
    num_labels: int = 2,
    vocab_size: int = 400,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    **config_overrides: Any,
) -> Path:
    """Save a random Qwen3 checkpoint (safetensors) and a byte-level BPE tokenizer in ``directory``.

    ``task``: "classification" / "regression" (Qwen3ForSequenceClassification), "qa"
    (Qwen3ForQuestionAnswering) or "lm" (Qwen3ForCausalLM). Size: hidden 32, 2 layers, 4 query heads,
    2 key/value heads of dim 8, tied embeddings, unless ``config_overrides`` say otherwise
    (see ``tiny_qwen3_config``; ``pad_token_id=None`` gives a config without one, like Qwen/Qwen3-0.6B).
    """
    num_labels = _check_model_task(task, num_labels)
    directory = Path(directory)
    tokenizer = train_bpe_tokenizer(directory, texts, vocab_size)
    settings = _settings(task, tokenizer, vocab_size, num_labels, eos_token_id=tokenizer.eos_token_id)
    config = tiny_qwen3_config(**{**settings, **config_overrides})
    return _save_random_model("qwen3", task, config, seed, directory)


# --------------------------------------------------------------------------------------------------------
# Small datasets in the real schema.


@dataclasses.dataclass(frozen=True)
class TinyDataFiles:
    """Paths to pass as data.train_file / data.validation_file (comma-separated for several splits)."""

    train_file: str
    validation_file: str


def _write_jsonl(path: Path, rows: Iterable[dict]) -> str:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _glue_row(task: str, rng: np.random.Generator) -> dict[str, Any]:
    """One synthetic row of a GLUE task with a rule-based label."""
    if task == "cola":
        sentence, _, _ = _statement(rng)
        acceptable = int(rng.integers(2))
        if not acceptable:
            words = sentence.rstrip(".").split()
            sentence = " ".join(rng.permutation(words).tolist()) + "."
        return {"sentence": sentence, "label": acceptable}
    if task == "sst2":
        positive = int(rng.integers(2))
        adjective = _pick(rng, POSITIVE if positive else NEGATIVE)
        return {"sentence": f"the {_pick(rng, NOUNS)} was {adjective} .", "label": positive}
    first, name, noun = _statement(rng)
    same = int(rng.integers(2))
    other_name = name if same else _pick(rng, tuple(n for n in NAMES if n != name))
    other_noun = noun if same else _pick(rng, tuple(n for n in NOUNS if n != noun))
    paraphrase = f"The old {other_noun} was {_pick(rng, VERBS)} by {other_name}."
    if task in ("mrpc", "rte"):
        label = same if task == "mrpc" else 1 - same  # RTE: 0 = entailment
        return {"sentence1": first, "sentence2": paraphrase, "label": label}
    if task == "qqp":
        return {
            "question1": f"Where is the {noun} of {name}?",
            "question2": f"Which {other_noun} does {other_name} have?",
            "label": same,
        }
    if task == "qnli":
        return {"question": f"What did {other_name} see?", "sentence": first, "label": 1 - int(other_name == name)}
    if task == "stsb":
        shared = int(rng.integers(3))  # 0, 1 or 2 of (name, noun) shared
        name2 = name if shared >= 1 else _pick(rng, tuple(n for n in NAMES if n != name))
        noun2 = noun if shared == 2 else _pick(rng, tuple(n for n in NOUNS if n != noun))
        second = f"The old {noun2} was {_pick(rng, VERBS)} by {name2}."
        return {"sentence1": first, "sentence2": second, "label": 2.5 * shared}
    if task == "mnli":
        label = int(rng.integers(3))  # 0 entailment, 1 neutral, 2 contradiction
        hypothesis = (
            f"{name} saw the {noun}.",
            f"{_pick(rng, tuple(n for n in NAMES if n != name))} liked the {noun}.",
            f"{name} never saw the {noun}.",
        )[label]
        return {"premise": first, "hypothesis": hypothesis, "label": label}
    raise DataError(f"no tiny generator for GLUE task '{task}'")


def write_tiny_glue(
    directory: str | os.PathLike, task: str, n_train: int = 48, n_val: int = 16, seed: int = 0
) -> TinyDataFiles:
    """Write ``train.jsonl`` and validation jsonl file(s) of a GLUE task in the hub schema (with ``idx``)."""
    spec = get_task(task)
    if not spec.is_glue:
        raise DataError(f"write_tiny_glue needs a GLUE task, got '{task}'")
    config = spec.name.removeprefix("glue_")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rows(count: int):
        return [{**_glue_row(config, rng), "idx": i} for i in range(count)]

    train = _write_jsonl(directory / f"{config}_train.jsonl", rows(n_train))
    validation = [_write_jsonl(directory / f"{config}_{split}.jsonl", rows(n_val)) for split in spec.validation_splits]
    return TinyDataFiles(train_file=train, validation_file=",".join(validation))


def _squad_row(
    rng: np.random.Generator, index: int, max_facts: int, unanswerable: bool, gold_variants: bool
) -> dict[str, Any]:
    """A context of fact sentences and a question about one fact (or, unanswerable, about an absent name)."""
    num_facts = int(rng.integers(2, max_facts + 1))
    names = rng.permutation(NAMES)[: num_facts + 1].tolist()
    absent_name, names = names[-1], names[:-1]
    sentences, facts, position = [], [], 0
    for name in names:
        attribute = _pick(rng, tuple(ATTRIBUTES))
        value = _pick(rng, ATTRIBUTES[attribute])
        prefix = f"The {attribute} of {name} is "
        sentence = f"{prefix}{value}."
        facts.append((name, attribute, value, position + len(prefix)))
        sentences.append(sentence)
        position += len(sentence) + 1
    context = " ".join(sentences)
    name, attribute, value, start = facts[int(rng.integers(len(facts)))]
    if unanswerable:
        question, answers = f"What is the {attribute} of {absent_name}?", {"text": [], "answer_start": []}
    else:
        question = f"What is the {attribute} of {name}?"
        answers = {"text": [value], "answer_start": [start]}
        if gold_variants:  # several annotators, as in the real validation split
            answers = {"text": [value, f"is {value}", value], "answer_start": [start, start - 3, start]}
    return {
        "id": f"q{index:05d}",
        "title": f"Article {index // 4}",
        "context": context,
        "question": (" " if index % 5 == 0 else "") + question,  # some leading spaces, as in SQuAD
        "answers": answers,
    }


def write_tiny_squad(
    directory: str | os.PathLike,
    version: int = 1,
    n_train: int = 32,
    n_val: int = 12,
    seed: int = 0,
    max_facts: int = 24,
    unanswerable_fraction: float = 0.3,
) -> TinyDataFiles:
    """Write ``train.jsonl`` / ``validation.jsonl`` of SQuAD v1.1 (``version=1``) or v2.0 (``version=2``) rows.

    Contexts hold 2..``max_facts`` fact sentences (long ones need several windows); v2 makes about
    ``unanswerable_fraction`` of the questions unanswerable (empty answers).
    """
    if version not in (1, 2):
        raise ValueError(f"SQuAD version must be 1 or 2, got {version}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stem = "squad" if version == 1 else "squad_v2"

    def rows(count: int, offset: int, validation: bool):
        return [
            _squad_row(
                rng,
                offset + i,
                max_facts,
                unanswerable=version == 2 and rng.random() < unanswerable_fraction,
                gold_variants=validation,
            )
            for i in range(count)
        ]

    train = _write_jsonl(directory / f"{stem}_train.jsonl", rows(n_train, 0, False))
    validation = _write_jsonl(directory / f"{stem}_validation.jsonl", rows(n_val, n_train, True))
    return TinyDataFiles(train_file=train, validation_file=validation)
