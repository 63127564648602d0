"""Non-finite guard: a device-side record of the first step whose loss or gradients were NaN/inf.

The loss watched is ``slot_losses`` (every slot's training loss; the one loss for ``lora`` / ``joint``): it is
computed in every step, where ``loss`` (AdaPaD's committed model) only is on the steps the trainer logs.

The record is updated by a tiny jitted function after every step (no host sync); the host reads it only where
it already syncs (log steps) and before every checkpoint save or export, so a diverged state is never written.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.runtime.failures import Diverged

# Quantities watched, in the order of the record's columns after the step counter.
WATCHED = ("slot_losses", "grad_norm")
_NAMES = {"slot_losses": "the loss", "grad_norm": "the gradient norm"}


@jax.jit
def _update(record: jax.Array, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """record = [steps done, first bad step of loss (0: none), first bad step of grad_norm (0: none)]."""
    step = record[0] + 1
    bad = jnp.stack([~jnp.all(jnp.isfinite(loss)), ~jnp.all(jnp.isfinite(grad_norm))])
    first = jnp.where((record[1:] == 0) & bad, step, record[1:])
    return jnp.concatenate([step[None], first])


@jax.jit
def _tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class FiniteGuard:
    """Tracks the first non-finite loss / gradient step on device; ``check`` raises ``Diverged`` (host sync)."""

    def __init__(self, start_step: int):
        self.record = jnp.array([int(start_step), 0, 0], jnp.int32)

    def update(self, metrics: dict[str, Any]) -> None:
        """Fold one step's metrics into the record (asynchronous)."""
        self.record = _update(self.record, metrics["slot_losses"], metrics["grad_norm"])

    def check(self, saved_step: int | None = None) -> None:
        """Raise ``Diverged`` naming the first bad step and quantity, if any; ``saved_step``: newest checkpoint."""
        record = np.asarray(jax.device_get(self.record))
        bad = [(int(step), order) for order, step in enumerate(record[1:]) if step]
        if bad:
            step, order = min(bad)  # the earliest step; at a tie, the loss before the gradients
            raise Diverged(diverged_message(step, _NAMES[WATCHED[order]], saved_step))


def state_is_finite(tree: Any) -> bool:
    """True when every float leaf of ``tree`` is finite (one device reduction, one host sync)."""
    return bool(jax.device_get(_tree_all_finite(tree)))


def diverged_message(step: int, quantity: str, saved_step: int | None) -> str:
    """The one line a diverged run ends with."""
    kept = (f"the newest checkpoint (step {saved_step}) is finite and kept" if saved_step is not None
            else "no checkpoint was written")
    return (f"training diverged: {quantity} is not finite (NaN or inf) at step {step}; nothing non-finite was "
            f"saved or exported and {kept}; lower optim.learning_rate (or raise optim.warmup_steps) and rerun")
