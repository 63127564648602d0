"""Command-line entry points: ``adapad-train``, ``adapad-export``, ``adapad-predict`` (one module per command).

Each module is also runnable with ``python -m adapad_jax.cli.<command>``; ``launch/*.py`` are thin wrappers.
"""
