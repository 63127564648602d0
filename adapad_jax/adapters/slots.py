"""Adapter slot storage and the ``lora`` collections built from it.

Slot storage for M adapted modules is ``{"a": [a_0, ..., a_{M-1}], "b": [...]}`` with
``a_m`` [R, in_m] and ``b_m`` [R, out_m] (R = r_max, slot axis leading). Masks
``committed`` / ``live`` are [M, R] bool arrays. The functions here turn that state into the
``lora`` collection that ``AdaptedDense`` reads (rows ``a``, ``b``, per-row ``coef``):

- :func:`deflated_lora` — the forward of slot k: rows j < k from the stop-gradient snapshot
  with ``coef = s * committed``, row k live with ``coef = s * live``, rows above k off;
- :func:`masked_lora` — current values with ``coef = s * mask`` (evaluation: ``committed``;
  ``joint``: ``committed + E * reserve``, IncreLoRA's E = 1e-5; ``lora``: all rows).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapad_jax.adapters.target import AdapterTarget

Slots = dict[str, list[jax.Array]]


def init_slots(
    targets: Sequence[AdapterTarget], num_slots: int, init_std: float, key: jax.Array, zero_b: bool = False
) -> Slots:
    """Draw ``a`` (and ``b`` unless ``zero_b``) of every slot from N(0, init_std^2)."""
    a_list, b_list = [], []
    for m, target in enumerate(targets):
        key_a, key_b = jax.random.split(jax.random.fold_in(key, m))
        a_list.append(init_std * jax.random.normal(key_a, (num_slots, target.in_features), jnp.float32))
        if zero_b:
            b_list.append(jnp.zeros((num_slots, target.out_features), jnp.float32))
        else:
            b_list.append(init_std * jax.random.normal(key_b, (num_slots, target.out_features), jnp.float32))
    return {"a": a_list, "b": b_list}


def to_lora_collection(
    targets: Sequence[AdapterTarget], a_rows: Sequence[jax.Array], b_rows: Sequence[jax.Array], coefs: Sequence[jax.Array]
) -> dict[str, Any]:
    """Nest per-module rows ``a``, ``b``, ``coef`` at each target's Flax path."""
    flat = {}
    for target, a, b, coef in zip(targets, a_rows, b_rows, coefs):
        flat[tuple(target.flax_path) + ("a",)] = a
        flat[tuple(target.flax_path) + ("b",)] = b
        flat[tuple(target.flax_path) + ("coef",)] = coef
    return traverse_util.unflatten_dict(flat)


def masked_lora(
    targets: Sequence[AdapterTarget], slots: Slots, mask: jax.Array, scaling: float, num_rows: int | None = None
) -> dict[str, Any]:
    """Current slot values with ``coef = scaling * mask`` on the first ``num_rows`` rows (default all)."""
    rows = mask.shape[1] if num_rows is None else num_rows
    coefs = [scaling * mask[m, :rows].astype(jnp.float32) for m in range(len(targets))]
    return to_lora_collection(
        targets, [a[:rows] for a in slots["a"]], [b[:rows] for b in slots["b"]], coefs
    )


def deflated_lora(
    targets: Sequence[AdapterTarget],
    slots: Slots,
    snapshot: Slots,
    committed: jax.Array,
    live: jax.Array,
    slot: jax.Array,
    scaling: float,
    num_rows: int,
) -> dict[str, Any]:
    """The ``lora`` collection of the deflated forward of slot ``slot`` (a traced int) over rows < ``num_rows``."""
    row = jnp.arange(num_rows)
    before = row < slot
    at = row == slot
    a_rows, b_rows, coefs = [], [], []
    for m in range(len(targets)):
        snap_a = jax.lax.stop_gradient(snapshot["a"][m][:num_rows])
        snap_b = jax.lax.stop_gradient(snapshot["b"][m][:num_rows])
        a_rows.append(jnp.where(before[:, None], snap_a, slots["a"][m][:num_rows]))
        b_rows.append(jnp.where(before[:, None], snap_b, slots["b"][m][:num_rows]))
        coef = jnp.where(before, committed[m, :num_rows], jnp.where(at, live[m, :num_rows], False))
        coefs.append(scaling * coef.astype(jnp.float32))
    return to_lora_collection(targets, a_rows, b_rows, coefs)


def committed_peft_factors(targets: Sequence[AdapterTarget], slots: Slots, committed: Any) -> dict[str, tuple[Any, Any]]:
    """``{hf_path: (A [r, in], B [out, r])}`` from the committed rows of every module (numpy)."""
    committed = np.asarray(committed)
    out = {}
    for m, target in enumerate(targets):
        rows = np.nonzero(committed[m])[0]
        a = np.asarray(slots["a"][m])[rows]
        b = np.asarray(slots["b"][m])[rows]
        out[target.hf_path] = (a, b.T.copy())
    return out
