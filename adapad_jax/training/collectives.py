"""One large collective inside ``shard_map``: a pytree's leaves packed into one buffer per dtype.

Across processes every collective is a point where each process waits for the slowest, plus a fixed latency.
XLA's all-reduce combiner may merge per-leaf reductions, but whether it does depends on its thresholds and
the schedule; packing makes it one all-reduce per dtype regardless (``launch/benchmark.py --suite scaling``
reports the count of the compiled step).
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


def psum_packed(tree: Any, axis_name: str | tuple[str, ...]) -> Any:
    """``jax.lax.psum(tree, axis_name)`` as one all-reduce per dtype, over the named axes that span more than
    one device: a reduction over the others moves nothing, but XLA would still emit it (with one-device groups)."""
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    names = tuple(name for name in names if jax.lax.axis_size(name) > 1)
    if not jax.tree.leaves(tree) or not names:
        return tree
    buffers, unpack = _pack(tree)
    return unpack({dtype: jax.lax.psum(buffer, names) for dtype, buffer in buffers.items()})
