"""ARD-LoRA (Shinwari and Usama 2025) as pure rules, from the seed abstract only (no public code).

Pure rules; the trainer uses them once the method seam lands. Nothing here is wired into ``trainer.py``,
``config.py`` or ``validation.py`` yet. ``tests/test_ardlora_rules.py`` checks each rule against hand-computed
values.

What the abstract fixes (/work/shared/reference/ard_lora_abstract.txt): a learnable scaling factor alpha per
module (per layer and head in the paper), effective rank ``r = round(r0 * alpha)`` (BASELINES.md adds the
floor of 1: ``max(1, round(r0 * alpha))``), and the meta-objective ``task loss + lambda * (l1(alpha) +
beta * TV(alpha))``. It gives no defaults for r0, lambda, beta, the alpha learning rate or alpha's init; none is
invented here beyond ``alpha`` starting at 1 (rank r0), which ``init_alpha`` does.

Our choices (the abstract does not say; each is ours and tested as such):

- layout: alpha is an array whose axis 0 is the layer index, e.g. [L] for one module type, [L, T] for T module
  types or [L, H] for heads; each module carries ``r_max`` slots (``a`` [r_max, in], ``b`` [r_max, out]), so the
  rank can grow past r0 up to ``r_max``.
- rounding: half up, ``floor(r0 * alpha + 0.5)`` (the abstract's nearest-integer bracket; numpy's half-to-even
  would make 2.5 -> 2 but 3.5 -> 4), then clipped to [1, r_max].
- relaxation: slot k (1-based) is on in the forward iff k <= the effective rank (a hard 0/1 mask); its gradient
  is that of the soft mask ``sigmoid((r0 * alpha - k + 0.5) / tau)`` (straight-through), which is 1/2 exactly
  at the rounding boundary ``r0 * alpha = k - 0.5``. Slot 1 is always on in the forward (the floor of 1) but
  still passes the soft mask's gradient to alpha. ``tau`` defaults to 0.5.
- regulariser: ``l1 = sum |alpha|`` (a sum, not a mean) and ``TV = sum |alpha[l+1] - alpha[l]|`` along axis 0
  (the layer index) summed over every other axis, i.e. across layers within one module type / head, never
  across module types; the term is ``lambda * (l1 + beta * TV)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from adapad_jax.adapters.layer import low_rank_delta
from adapad_jax.methods.base import Method, MethodSetup

DEFAULT_TAU = 0.5


def init_alpha(shape: Sequence[int]) -> jax.Array:
    """Scaling factors at 1 (every module starts at rank r0)."""
    return jnp.ones(tuple(shape), jnp.float32)


def effective_rank(alpha: jax.Array, r0: int, r_max: int) -> jax.Array:
    """``clip(floor(r0 * alpha + 0.5), 1, r_max)`` as int32, element-wise."""
    return jnp.clip(jnp.floor(r0 * alpha + 0.5), 1, r_max).astype(jnp.int32)


def soft_mask(alpha: jax.Array, r0: int, r_max: int, tau: float = DEFAULT_TAU) -> jax.Array:
    """``sigmoid((r0 * alpha - k + 0.5) / tau)`` for k = 1..r_max, shape alpha.shape + (r_max,)."""
    k = jnp.arange(1, r_max + 1, dtype=jnp.float32)
    return jax.nn.sigmoid((r0 * alpha[..., None] - k + 0.5) / tau)


def hard_mask(alpha: jax.Array, r0: int, r_max: int) -> jax.Array:
    """1.0 for slots k <= the effective rank, else 0.0, shape alpha.shape + (r_max,)."""
    k = jnp.arange(1, r_max + 1)
    return (k <= effective_rank(alpha, r0, r_max)[..., None]).astype(jnp.float32)


def slot_mask(alpha: jax.Array, r0: int, r_max: int, tau: float = DEFAULT_TAU) -> jax.Array:
    """The straight-through mask: ``hard_mask`` forward, ``soft_mask``'s gradient backward."""
    soft = soft_mask(alpha, r0, r_max, tau)
    return hard_mask(alpha, r0, r_max) + soft - jax.lax.stop_gradient(soft)


def masked_delta(x: jax.Array, a: jax.Array, b: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """One module's adapter output ``((x a^T) * mask) b * scale`` with its [r_max] slot mask."""
    return low_rank_delta(x, a, b, mask * scale)


def total_variation(alpha: jax.Array) -> jax.Array:
    """``sum |alpha[l+1] - alpha[l]|`` along axis 0 (layers), summed over the other axes."""
    return jnp.sum(jnp.abs(jnp.diff(alpha, axis=0)))


def regulariser(alpha: jax.Array, lam: float, beta: float) -> jax.Array:
    """``lam * (sum |alpha| + beta * TV(alpha))``."""
    return lam * (jnp.sum(jnp.abs(alpha)) + beta * total_variation(alpha))


class ARDLoRA(Method):
    """``adapter.method=ardlora`` on the method seam (``methods/base.py``). Not wired into the trainer yet."""

    name = "ardlora"

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        from adapad_jax.runtime.failures import ConfigError

        raise ConfigError("adapter.method=ardlora: ARD-LoRA is not wired into the trainer yet")
