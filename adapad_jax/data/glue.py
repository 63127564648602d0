"""GLUE tokenisation: sentence or sentence pair -> fixed-length arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from adapad_jax.runtime import progress
from adapad_jax.data.squad import CHUNK_ROWS, model_arrays
from adapad_jax.data.tasks import DataError, TaskSpec


def tokenize_glue(
    dataset: Any,
    spec: TaskSpec,
    tokenizer: Any,
    max_length: int = 128,
    with_token_type_ids: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, np.ndarray]:
    """Tokenise a GLUE split (pairs as (text_a, text_b)), padded to ``max_length``.

    Returns ``input_ids``, ``attention_mask`` [N, max_length] int32, ``token_type_ids`` when the tokenizer
    makes them and ``with_token_type_ids``, ``labels`` [N] (int32, float32 for regression), ``idx`` [N] int64.
    """
    if spec.kind not in ("classification", "regression"):
        raise DataError(f"tokenize_glue got task {spec.name} of kind {spec.kind}")
    if len(dataset) == 0:
        raise DataError(f"no rows to tokenise for task {spec.name}")
    parts = []
    chunks = range(0, len(dataset), chunk_rows)
    for first in progress.iterate(chunks, len(chunks), f"tokenise {spec.name} ({len(dataset)} rows)", unit="chunks"):
        rows = dataset[first : first + chunk_rows]
        encoded = tokenizer(
            *[list(rows[column]) for column in spec.text_columns],
            truncation=True,
            max_length=max_length,
            padding="max_length",
        )
        parts.append(model_arrays(encoded, with_token_type_ids))
    features = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    label_dtype = np.float32 if spec.kind == "regression" else np.int32
    features["labels"] = np.asarray(dataset[spec.label_column], dtype=label_dtype)
    features["idx"] = np.asarray(dataset[spec.id_column], dtype=np.int64)
    return features
