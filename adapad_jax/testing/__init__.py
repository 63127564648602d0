"""Tiny offline stand-ins for tests and the demo: tokenizers, random checkpoints, small datasets."""
