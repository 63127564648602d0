"""Few, large collectives inside ``shard_map``: a pytree's leaves packed into one buffer per dtype.

Across processes every collective pays a fixed latency (about 5 ms per all-reduce between two CPU processes
on this machine under load), and XLA:CPU does not combine them; a step that reduces each gradient leaf on its
own pays it dozens of times (``launch/benchmark.py --suite scaling`` reports the count).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _pack(tree: Any) -> tuple[dict[Any, jax.Array], Callable[[dict[Any, jax.Array]], Any]]:
    """Leaves flattened and concatenated per dtype, and the function that cuts such buffers back into the tree.

    The unpacker takes buffers whose last axis is the packed one (leading axes are kept on every leaf).
    """
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict[Any, list[int]] = {}
    for index, leaf in enumerate(leaves):
        groups.setdefault(jnp.dtype(leaf.dtype), []).append(index)
    buffers = {dtype: jnp.concatenate([leaves[i].reshape(-1) for i in idx]) for dtype, idx in groups.items()}

    def unpack(packed: dict[Any, jax.Array]) -> Any:
        out: list[Any] = [None] * len(leaves)
        for dtype, idx in groups.items():
            offset = 0
            for i in idx:
                size = leaves[i].size
                piece = packed[dtype][..., offset : offset + size]
                out[i] = piece.reshape(piece.shape[:-1] + leaves[i].shape)
                offset += size
        return jax.tree.unflatten(treedef, out)

    return buffers, unpack


def psum_packed(tree: Any, axis_name: Any) -> Any:
    """``jax.lax.psum(tree, axis_name)`` as one all-reduce per dtype."""
    if not jax.tree.leaves(tree):
        return tree
    buffers, unpack = _pack(tree)
    return unpack({dtype: jax.lax.psum(buffer, axis_name) for dtype, buffer in buffers.items()})


def all_gather_packed(tree: Any, axis_name: str) -> Any:
    """``all_gather(x, axis_name, tiled=True)`` of every leaf (concatenated on axis 0), as one all-gather per dtype."""
    if not jax.tree.leaves(tree):
        return tree
    buffers, unpack = _pack(tree)
    gathered = unpack({dtype: jax.lax.all_gather(buffer, axis_name) for dtype, buffer in buffers.items()})
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), gathered)
