"""Adam whose bias correction counts each slot's own steps from its activation.

optax's ``scale_by_adam`` keeps one global step count, so a reserve that becomes live at step 500 starts from
zero moments but is bias-corrected as if it had 500 steps behind it: its first update is
``(1 - b1) g / sqrt((1 - b2) g^2) ~ 3.2 x`` a fresh Adam's. Here every slot row (module m, slot k) has its own
count: it advances, and the slot's moments update, only on steps where ``live[m, k]``; the first update of a
slot is a fresh Adam's first update, ``g / (|g| + eps)``. The task head (always trained) uses the global count,
exactly as ``optax.scale_by_adam``. Pass the [M, R] live mask as ``tx.update(..., live=mask)``; without it every
slot counts as live (then this equals ``optax.scale_by_adam``).

Trainable tree: ``{"slots": {part: [per-module [R, n] arrays]}, "head": ...}``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SlotAdamState(NamedTuple):
    """Global count (head), per-slot counts [M, R], first and second moments (same tree as the params)."""

    count: jax.Array
    slot_count: jax.Array
    mu: Any
    nu: Any


def _slot_shape(params: Any) -> tuple[int, int]:
    parts = params["slots"]
    first = next(iter(parts.values()))
    return len(first), (first[0].shape[0] if first else 0)


def scale_by_slot_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam`` with per-slot bias correction keyed by the ``live`` [M, R] mask (extra arg)."""

    def init_fn(params: Any) -> SlotAdamState:
        modules, rows = _slot_shape(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SlotAdamState(jnp.zeros((), jnp.int32), jnp.zeros((modules, rows), jnp.int32), zeros,
                             jax.tree.map(jnp.zeros_like, params))

    def moments(g, mu, nu):
        return b1 * mu + (1.0 - b1) * g, b2 * nu + (1.0 - b2) * jnp.square(g)

    def direction(mu, nu, count):
        count = count.astype(jnp.float32)
        return (mu / (1.0 - b1**count)) / (jnp.sqrt(nu / (1.0 - b2**count)) + eps)

    def update_fn(updates: Any, state: SlotAdamState, params: Any = None, *, live: jax.Array | None = None, **_):
        del params
        if live is None:
            live = jnp.ones(state.slot_count.shape, bool)
        count = optax.safe_increment(state.count)
        slot_count = state.slot_count + live.astype(jnp.int32)
        others = lambda tree: {key: value for key, value in tree.items() if key != "slots"}  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, others(updates), others(state.mu))
        nu = jax.tree.map(lambda g, v: b2 * v + (1.0 - b2) * jnp.square(g), others(updates), others(state.nu))
        out = jax.tree.map(lambda m, v: direction(m, v, count), mu, nu)
        out["slots"], mu["slots"], nu["slots"] = {}, {}, {}
        for part, grads in updates["slots"].items():
            new_u, new_mu, new_nu = [], [], []
            for m, g in enumerate(grads):
                on = live[m][:, None]
                slot_c = jnp.maximum(slot_count[m], 1)[:, None]
                mu_m, nu_m = moments(g, state.mu["slots"][part][m], state.nu["slots"][part][m])
                u = direction(mu_m, nu_m, slot_c)
                new_u.append(jnp.where(on, u, 0.0).astype(g.dtype))
                new_mu.append(jnp.where(on, mu_m, state.mu["slots"][part][m]))
                new_nu.append(jnp.where(on, nu_m, state.nu["slots"][part][m]))
            out["slots"][part], mu["slots"][part], nu["slots"][part] = new_u, new_mu, new_nu
        return out, SlotAdamState(count, slot_count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
