"""The adapted linear layer shared by every model family.

A module that can carry adapters is an ``AdaptedDense``. Its frozen weight lives
in the ``params`` collection (``kernel`` [in, out], ``bias`` [out]). Adapter
factors arrive, per forward, in a separate ``lora`` collection at the same
module path:

- ``a``: [R, in] — right factors (PEFT's ``lora_A`` rows),
- ``b``: [R, out] — left factors (PEFT's ``lora_B`` columns),
- ``coef``: [R] — per-slot multiplier, scaling and masks folded in.

so that ``y = x W + bias + ((drop(x) a^T) * coef) b``. With no ``lora`` entry the
layer is exactly the base layer. Which slots are live, which come from the
stop-gradient snapshot, and the scaling are decided by
``adapad_jax.adapters.slots``; the layer only applies what it is given.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"


@jax.custom_vjp
def low_rank_delta(x: jax.Array, a: jax.Array, b: jax.Array, coef: jax.Array) -> jax.Array:
    """``((x a^T) * coef) b``: x [..., in], a [R, in], b [R, out], coef [R] -> [..., out].

    The same numbers as the two einsums; the backward is written out so that the output gradient is
    materialised once, in its own layout, before the adapter's factor gradients read it. Left to autodiff, XLA
    fuses the producer of that gradient (e.g. the GELU backward of a feed-forward block) into a transposed copy
    for ``b``'s gradient and computes it twice, once in a cache-hostile order: 0.8 of a 3.8 s DeBERTaV3-base
    forward+backward on one CPU core (``launch/benchmark.py --suite models``).
    """
    return _low_rank_delta_fwd(x, a, b, coef)[0]


def _low_rank_delta_fwd(x, a, b, coef):
    projected = jnp.einsum("...i,ri->...r", x, a)
    return jnp.einsum("...r,ro->...o", projected * coef, b), (x, a, b, coef, projected)


def _low_rank_delta_bwd(residuals, grad_out):
    x, a, b, coef, projected = residuals
    grad_out = jax.lax.optimization_barrier(grad_out)
    grad_h = jnp.einsum("...o,ro->...r", grad_out, b)
    batch_axes = tuple(range(grad_out.ndim - 1))
    grad_b = jnp.tensordot(projected * coef, grad_out, axes=(batch_axes, batch_axes))
    grad_coef = jnp.sum(grad_h * projected, axis=batch_axes)
    grad_projected = grad_h * coef
    grad_x = jnp.einsum("...r,ri->...i", grad_projected, a)
    grad_a = jnp.tensordot(grad_projected, x, axes=(batch_axes, batch_axes))
    return grad_x, grad_a, grad_b, grad_coef


low_rank_delta.defvjp(_low_rank_delta_fwd, _low_rank_delta_bwd)


class AdaptedDense(nn.Module):
    """A dense layer (``kernel`` [in, out]) that adds rank-1 adapter slots from the ``lora`` collection."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.normal(stddev=0.02)
    bias_init: Any = nn.initializers.zeros
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable(LORA_COLLECTION, "a"):
            a = self.get_variable(LORA_COLLECTION, "a").astype(self.dtype)
            b = self.get_variable(LORA_COLLECTION, "b").astype(self.dtype)
            coef = self.get_variable(LORA_COLLECTION, "coef").astype(self.dtype)
            x_in = nn.Dropout(rate=self.adapter_dropout)(x, deterministic=deterministic)
            y = y + low_rank_delta(x_in, a, b, coef)
        return y
