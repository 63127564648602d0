"""How the frozen backbone is stored on the devices: in the compute dtype where that changes no number."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Leaves every layer casts to its compute dtype before use (AdaptedDense / nn.Dense kernels, nn.Embed tables), so
# storing them in that dtype gives the same numbers with half the memory and host-to-device traffic.
CAST_AT_USE = ("kernel", "embedding")
# Tables read in float32 before any cast (DeBERTa's relative embeddings go through a LayerNorm first).
READ_IN_FLOAT32 = ("rel_embeddings",)


def frozen_storage(params: Any, compute_dtype: Any) -> Any:
    """``params`` with every weight that is cast to ``compute_dtype`` at use already in it (bf16/fp16 only)."""
    dtype = jnp.dtype(compute_dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return params
    flat = traverse_util.flatten_dict(params)

    def convert(path: tuple[str, ...], leaf: Any) -> Any:
        floating = jnp.issubdtype(np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype, jnp.floating)
        if floating and path[-1] in CAST_AT_USE and not set(path) & set(READ_IN_FLOAT32):
            return np.asarray(jax.device_get(leaf)).astype(dtype)
        return leaf

    return traverse_util.unflatten_dict({path: convert(path, leaf) for path, leaf in flat.items()})


def module_dtype(module: Any) -> Any:
    """The compute dtype of a model's top-level module (float32 when it has none)."""
    return jnp.dtype(getattr(module, "dtype", jnp.float32))
