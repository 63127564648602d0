"""AdaPaD (Adaptive Parallel Deflation for LoRA) in JAX/Flax."""

__version__ = "0.1.0"
