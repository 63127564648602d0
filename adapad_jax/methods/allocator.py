"""Dynamic rank discovery (SPEC §2): importance EMAs and top-k promotion of reserves.

Allocator state (a dict of arrays, M modules, R = r_max slots):
``committed`` [M, R] bool (slots 0..rank-1), ``reserve`` [M, R] bool (slot ``rank`` while a
promotion is still possible), ``rank`` [M] int32, ``imp_ema`` / ``unc_ema`` [M] float32,
``budget_left`` int32 (rank budget minus the sum of ranks), ``budget_spent_step`` int32 (the step after which
``budget_left`` reached 0; 0 if it started at 0, -1 while budget is left).
Once the budget is spent no reserve is kept (it could never be promoted), so it costs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.config.validation import check_initial_rank, check_rank_budget

AllocState = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class AllocatorConfig:
    """Static allocator settings (taken from ``config.adapter``)."""

    r_max: int
    top_k: int
    growth_interval: int
    beta1: float = 0.85
    beta2: float = 0.85
    importance: str = "score"  # "score" | "uniform"
    grow: bool = True

    def __post_init__(self):
        if self.importance not in ("score", "uniform"):
            raise ValueError(f"adapter.importance must be 'score' or 'uniform', got {self.importance!r}")
        if self.growth_interval < 1:
            raise ValueError(f"adapter.growth_interval must be >= 1, got {self.growth_interval}")
        if self.top_k < 0:
            raise ValueError(f"adapter.top_k must be >= 0, got {self.top_k}")


def masks_from_rank(rank: jax.Array, r_max: int, budget_left: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Committed slots 0..rank-1 and a reserve at slot ``rank`` (if < r_max and budget is left)."""
    slot = jnp.arange(r_max)[None, :]
    committed = slot < rank[:, None]
    reserve = (slot == rank[:, None]) & (rank[:, None] < r_max) & (budget_left > 0)
    return committed, reserve


def init_allocator(num_modules: int, r_max: int, initial_rank: int, rank_budget: int) -> AllocState:
    """Every module starts with ``initial_rank`` committed slots and one reserve."""
    check_initial_rank(initial_rank, r_max)
    check_rank_budget(rank_budget, num_modules, initial_rank)
    rank = jnp.full((num_modules,), initial_rank, jnp.int32)
    budget_left = jnp.asarray(rank_capacity(rank_budget, num_modules, r_max) - num_modules * initial_rank, jnp.int32)
    committed, reserve = masks_from_rank(rank, r_max, budget_left)
    return {
        "committed": committed,
        "reserve": reserve,
        "rank": rank,
        "imp_ema": jnp.zeros((num_modules,), jnp.float32),
        "unc_ema": jnp.zeros((num_modules,), jnp.float32),
        "budget_left": budget_left,
        "budget_spent_step": jnp.where(budget_left == 0, 0, -1).astype(jnp.int32),
    }


def rank_capacity(rank_budget: int, num_modules: int, r_max: int) -> int:
    """The most total rank a run can commit at all: the budget, or every module at ``r_max`` when that is less."""
    return min(int(rank_budget), int(num_modules) * int(r_max))


def reachable_total_rank(
    num_modules: int, initial_rank: int, rank_budget: int, num_steps: int, config: AllocatorConfig
) -> int:
    """The most total rank growth can reach in ``num_steps`` steps.

    Growth happens after steps 2T, 3T, ... <= num_steps (see :func:`is_growth_step`): ``floor(num_steps / T) - 1``
    rounds of at most ``min(top_k, M)`` promotions each, capped by the budget and ``M * r_max``. Equal to the
    final total rank unless fewer than ``top_k`` modules are still below ``r_max`` in some round.
    """
    cap = rank_capacity(rank_budget, num_modules, config.r_max)
    rounds = max(num_steps // config.growth_interval - 1, 0) if config.grow else 0
    return min(cap, num_modules * initial_rank + rounds * min(config.top_k, num_modules))


def module_importance(slots: dict[str, list[jax.Array]], grads: dict[str, list[jax.Array]], committed: jax.Array) -> jax.Array:
    """Per module, the mean of |theta * grad| over the entries of its committed slots (a and b)."""
    values = []
    for m in range(len(slots["a"])):
        mask = committed[m].astype(jnp.float32)
        per_slot = jnp.abs(slots["a"][m] * grads["a"][m]).sum(-1) + jnp.abs(slots["b"][m] * grads["b"][m]).sum(-1)
        entries = mask.sum() * (slots["a"][m].shape[-1] + slots["b"][m].shape[-1])
        values.append((per_slot * mask).sum() / jnp.maximum(entries, 1.0))
    return jnp.stack(values)


def is_growth_step(step: int | jax.Array, config: AllocatorConfig) -> Any:
    """Growth happens after completed step t when t is a multiple of T and t >= 2T (one warm-up round)."""
    interval = config.growth_interval
    return (step % interval == 0) & (step >= 2 * interval)


def update_allocator(
    state: AllocState, importance: jax.Array, step: jax.Array, config: AllocatorConfig, key: jax.Array
) -> tuple[AllocState, jax.Array]:
    """Update the EMAs with this step's importance and, on a growth step, promote the top-k reserves.

    ``step`` is the 1-based number of the step just completed. Returns the new state and whether
    any module grew. Ties in the score go to the lowest module index.
    """
    imp_ema = config.beta1 * state["imp_ema"] + (1.0 - config.beta1) * importance
    unc_ema = config.beta2 * state["unc_ema"] + (1.0 - config.beta2) * jnp.abs(importance - imp_ema)
    rank, budget_left = state["rank"], state["budget_left"]
    if config.importance == "score":
        score = imp_ema * unc_ema
    else:
        score = jax.random.uniform(key, importance.shape)
    eligible = rank < config.r_max
    ordered = jnp.argsort(jnp.where(eligible, -score, jnp.inf), stable=True)
    position = jnp.zeros_like(rank).at[ordered].set(jnp.arange(rank.shape[0], dtype=rank.dtype))
    count = jnp.minimum(config.top_k, budget_left)
    grow_now = is_growth_step(step, config) & config.grow
    promote = eligible & (position < count) & grow_now
    rank = rank + promote.astype(rank.dtype)
    budget_left = budget_left - promote.sum().astype(budget_left.dtype)
    committed, reserve = masks_from_rank(rank, config.r_max, budget_left)
    new_state = {
        "committed": committed,
        "reserve": reserve,
        "rank": rank,
        "imp_ema": imp_ema,
        "unc_ema": unc_ema,
        "budget_left": budget_left,
    }
    if "budget_spent_step" in state:
        just_spent = (state["budget_left"] > 0) & (budget_left == 0)
        new_state["budget_spent_step"] = jnp.where(just_spent, jnp.asarray(step, jnp.int32), state["budget_spent_step"])
    return new_state, promote.any()


def live_mask(state: AllocState, advance_learning: bool) -> jax.Array:
    """Slots that train: committed, plus the reserve when advance learning is on."""
    return state["committed"] | state["reserve"] if advance_learning else state["committed"]


def num_live_slots(state: AllocState, advance_learning: bool) -> int:
    """1 + the highest slot index that is live in any module (host side; 0 if none)."""
    mask = np.asarray(live_mask(state, advance_learning)).any(axis=0)
    idx = np.nonzero(mask)[0]
    return int(idx[-1]) + 1 if idx.size else 0
