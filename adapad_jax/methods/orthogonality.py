"""AdaLoRA's orthogonal regulariser on the adapter factors, shared by adapad, joint, lora, adalora and increlora."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def _frobenius_norm(x: jax.Array) -> jax.Array:
    """||x||_F with a zero (not NaN) gradient at x = 0."""
    square = jnp.sum(jnp.square(x))
    positive = square > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, square, 1.0)), 0.0)


def orthogonality_penalty(slots: Mapping[str, list[jax.Array]], committed: jax.Array) -> jax.Array:
    """AdaLoRA's regulariser: mean over the 2M factors of ||A A^T - I||_F and ||B^T B - I||_F (committed rows).

    The norms are unsquared and averaged over every ``lora_A`` and ``lora_B`` matrix, as PEFT's ``AdaLoraModel``
    and IncreLoRA's ``compute_orth_regu`` do, so ``adapter.orth_reg`` means what it means in their configs.
    Rows outside ``committed`` are zeroed on both sides and contribute nothing.
    """
    total = jnp.zeros((), jnp.float32)
    num_modules = len(slots["a"])
    for m in range(num_modules):
        mask = committed[m].astype(jnp.float32)
        a = slots["a"][m] * mask[:, None]
        b = slots["b"][m] * mask[:, None]
        eye = jnp.diag(mask)
        total = total + _frobenius_norm(a @ a.T - eye) + _frobenius_norm(b @ b.T - eye)
    return total / max(2 * num_modules, 1)
