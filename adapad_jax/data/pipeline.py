"""One call from a task name and a tokenizer to tokenised train features and eval sets."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from adapad_jax.runtime import progress
from adapad_jax.data import feature_cache
from adapad_jax.data.glue import tokenize_glue
from adapad_jax.data.loading import load_raw_splits
from adapad_jax.data.squad import QAEvalFeatures, prepare_qa_eval_features, prepare_qa_train_features
from adapad_jax.data.tasks import DataError, TaskSpec, get_task

DEFAULT_MAX_LENGTH = {"classification": 128, "regression": 128, "qa": 384}


@dataclasses.dataclass
class EvalSet:
    """One validation split: raw rows, the arrays to batch, and (QA) the window bookkeeping."""

    split: str
    examples: Any  # datasets.Dataset of the raw rows
    features: dict[str, np.ndarray]  # arrays for eval_batches (GLUE ones also carry labels and idx)
    qa: QAEvalFeatures | None = None

    @property
    def num_features(self) -> int:
        """Rows the model sees (QA: windows, more than examples when contexts are long)."""
        return len(next(iter(self.features.values())))


@dataclasses.dataclass
class TaskData:
    """Tokenised training features (None when not loaded) and eval sets keyed by split name."""

    spec: TaskSpec
    train: dict[str, np.ndarray] | None
    evals: dict[str, EvalSet]
    max_length: int


def build_task_data(
    task: str | TaskSpec,
    tokenizer: Any,
    *,
    source: str = "auto",
    train_file: str = "",
    validation_file: str = "",
    max_length: int = 0,
    doc_stride: int = 128,
    max_train_examples: int = 0,
    max_eval_examples: int = 0,
    with_token_type_ids: bool = True,
    include_train: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> TaskData:
    """Load the task's splits (hub / local files) and tokenise them with the checkpoint's tokenizer.

    ``max_length`` 0 means the task default (GLUE 128, SQuAD 384). The tokenizer should have been through
    ``prepare_tokenizer`` (right padding, a pad token). ``cache_dir``: keep tokenised features there and reuse
    them when the data, tokenizer and settings are the same (see ``feature_cache``); None tokenises every time.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    max_length = max_length or DEFAULT_MAX_LENGTH[spec.kind]
    raw = load_raw_splits(
        spec,
        source=source,
        train_file=train_file,
        validation_file=validation_file,
        max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples,
        include_train=include_train,
    )
    tokenizer_hash = feature_cache.tokenizer_fingerprint(tokenizer) if cache_dir is not None else ""

    def tokenised(split: str, role: str, compute):
        settings = {"task": spec.name, "split": split, "role": role, "max_length": max_length,
                    "doc_stride": doc_stride if spec.kind == "qa" else None, "token_types": with_token_type_ids}
        if not (spec.is_glue or spec.kind == "qa"):  # task=custom: the same file read with other columns
            settings["text_columns"] = list(spec.text_columns)
        computed = []
        features = feature_cache.cached(cache_dir, raw[split], tokenizer_hash, settings,
                                        lambda: computed.append(True) or compute())
        if not computed:
            progress.current().line(f"tokenise {spec.name} {split}: {len(raw[split])} rows from the feature cache")
        return features

    train = None
    if "train" in raw:
        if spec.kind == "qa":
            train = tokenised("train", "qa_train", lambda: prepare_qa_train_features(
                raw["train"], tokenizer, max_length, doc_stride, with_token_type_ids, task_name=spec.name))
        else:
            train = tokenised("train", "glue", lambda: tokenize_glue(
                raw["train"], spec, tokenizer, max_length, with_token_type_ids))
    evals = {}
    for split in spec.validation_splits:
        if split not in raw:
            continue
        if spec.kind == "qa":
            qa = _qa_eval_from_arrays(tokenised(split, "qa_eval", lambda: _qa_eval_arrays(prepare_qa_eval_features(
                raw[split], tokenizer, max_length, doc_stride, with_token_type_ids, task_name=spec.name))))
            evals[split] = EvalSet(split, raw[split], qa.arrays, qa)
        else:
            features = tokenised(split, "glue", lambda: tokenize_glue(
                raw[split], spec, tokenizer, max_length, with_token_type_ids))
            evals[split] = EvalSet(split, raw[split], features)
    if include_train and train is None and not evals:
        raise DataError(f"no data was loaded for task {spec.name}")
    return TaskData(spec=spec, train=train, evals=evals, max_length=max_length)


def _qa_eval_arrays(qa: QAEvalFeatures) -> dict[str, np.ndarray]:
    """QA eval features as flat arrays (the cache stores arrays only)."""
    arrays = {f"model__{k}": v for k, v in qa.arrays.items()}
    arrays["example_index"] = qa.example_index
    arrays["example_id"] = np.asarray(qa.example_id, dtype=np.str_)
    arrays["offset_mapping"] = qa.offset_mapping
    return arrays


def _qa_eval_from_arrays(arrays: dict[str, np.ndarray]) -> QAEvalFeatures:
    return QAEvalFeatures(
        arrays={k[len("model__"):]: v for k, v in arrays.items() if k.startswith("model__")},
        example_index=arrays["example_index"],
        example_id=[str(x) for x in arrays["example_id"]],
        offset_mapping=arrays["offset_mapping"],
    )


def build_task_data_from_config(
    config: Any, tokenizer: Any, *, include_train: bool = True, with_token_type_ids: bool = True,
    task: str | TaskSpec | None = None,
) -> TaskData:
    """``build_task_data`` with the run config's ``task`` (or ``task``, e.g. the demo's spec) and ``data.*``
    fields (see adapad_jax/config/schema.py)."""
    data = config.data
    return build_task_data(
        task or config.task,
        tokenizer,
        source=data.get("source", "auto"),
        train_file=data.get("train_file", ""),
        validation_file=data.get("validation_file", ""),
        max_length=data.get("max_length", 0) or 0,
        doc_stride=data.get("doc_stride", 128),
        max_train_examples=data.get("max_train_examples", 0),
        max_eval_examples=data.get("max_eval_examples", 0),
        with_token_type_ids=with_token_type_ids,
        include_train=include_train,
        cache_dir=feature_cache_dir(config),
    )


def feature_cache_dir(config: Any) -> str | None:
    """Where a run keeps tokenised features: ``data.cache_dir`` or the default; None with
    ``data.cache_features=False``."""
    data = config.data
    if not data.get("cache_features", True):
        return None
    return str(data.get("cache_dir", "") or feature_cache.default_cache_dir())
