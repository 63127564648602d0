"""AdaPaD training: slot state, allocator, deflated train step, optimiser, sharding, checkpoints."""

from adapad_jax.training.sharding import make_mesh
from adapad_jax.training.trainer import Trainer

__all__ = ["Trainer", "make_mesh"]
