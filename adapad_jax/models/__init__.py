"""Flax ports of the transformers models AdaPaD fine-tunes."""

from adapad_jax.models.base import AdapterTarget, LoadedModel, LoadReport

__all__ = ["AdapterTarget", "LoadedModel", "LoadReport"]
