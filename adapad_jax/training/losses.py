"""Task losses as (weighted sum, weight sum) pairs, so a data-sharded mean is exact.

Each function returns ``(numerator, denominator)``: the example-weighted sum of per-example
(per-token for ``lm``) losses and the sum of the weights. The mean loss is their ratio;
under data parallelism both are summed over shards first.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from adapad_jax.models.base import MODEL_TASKS


def _weights(batch: Mapping[str, Any], size: int) -> jax.Array:
    if "example_weight" in batch:
        return jnp.asarray(batch["example_weight"], jnp.float32)
    return jnp.ones((size,), jnp.float32)


def loss_terms(task: str, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """Weighted loss sum and weight sum of one batch for ``task``."""
    if task == "classification":
        logits = outputs["logits"].astype(jnp.float32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"].astype(jnp.int32))
    elif task == "regression":
        pred = outputs["logits"].astype(jnp.float32)
        pred = pred.reshape(pred.shape[0], -1)
        labels = batch["labels"].astype(jnp.float32).reshape(pred.shape[0], -1)
        per_example = jnp.square(pred - labels).mean(-1)
    elif task == "qa":
        start = optax.softmax_cross_entropy_with_integer_labels(
            outputs["start_logits"].astype(jnp.float32), batch["start_positions"].astype(jnp.int32)
        )
        end = optax.softmax_cross_entropy_with_integer_labels(
            outputs["end_logits"].astype(jnp.float32), batch["end_positions"].astype(jnp.int32)
        )
        per_example = 0.5 * (start + end)
    elif task == "lm":
        logits = outputs["logits"][:, :-1].astype(jnp.float32)
        targets = batch["labels"] if "labels" in batch else batch["input_ids"]
        targets = targets[:, 1:].astype(jnp.int32)
        token_mask = batch["attention_mask"][:, 1:].astype(jnp.float32) if "attention_mask" in batch else 1.0
        token_mask = token_mask * (targets >= 0)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
        weight = _weights(batch, logits.shape[0])[:, None] * token_mask
        return (per_token * weight).sum(), weight.sum()
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {MODEL_TASKS}")
    weight = _weights(batch, per_example.shape[0])
    return (per_example * weight).sum(), weight.sum()
