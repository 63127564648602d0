"""AdamW with separate weight decay for adapters and head, warmup + linear/cosine decay, grad clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from adapad_jax.training.slot_adam import scale_by_slot_adam


def learning_rate_schedule(learning_rate: float, warmup_steps: int, total_steps: int, kind: str) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then linear or cosine decay to 0 at ``total_steps``."""
    if kind not in ("linear", "cosine"):
        raise ValueError(f"optim.schedule must be 'linear' or 'cosine', got {kind!r}")
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, end_value=0.0)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, warmup_steps),
            optax.linear_schedule(learning_rate, 0.0, total_steps - warmup_steps),
        ],
        [warmup_steps],
    )


def make_optimizer(optim_config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser for a trainable tree ``{"slots": ..., "head": ...}`` and its schedule."""
    schedule = learning_rate_schedule(
        optim_config.learning_rate, optim_config.warmup_steps, total_steps, optim_config.schedule
    )

    def mask_of(part: str):
        return lambda tree: {k: jax.tree.map(lambda _: k == part, v) for k, v in tree.items()}

    chain = []
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(optim_config.grad_clip))
    chain += [
        # Per-slot bias correction from each slot's activation; tx.update(..., live=[M, R] mask).
        scale_by_slot_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps),
        optax.add_decayed_weights(optim_config.adapter_weight_decay, mask=mask_of("slots")),
        optax.add_decayed_weights(optim_config.weight_decay, mask=mask_of("head")),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*chain), schedule
