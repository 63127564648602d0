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
            h = jnp.einsum("...i,ri->...r", x_in, a) * coef
            y = y + jnp.einsum("...r,ro->...o", h, b)
        return y
