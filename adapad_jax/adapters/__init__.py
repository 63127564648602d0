"""Rank-1 adapter slots: the adapted linear layer and the slot bookkeeping."""

from adapad_jax.adapters.layer import AdaptedDense

__all__ = ["AdaptedDense"]
