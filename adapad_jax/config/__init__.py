"""Configuration: the schema (``schema.py``), its validation, the paper presets and the task-hook registry."""

from adapad_jax.config.schema import ConfigError, base_config, field_docs

__all__ = ["ConfigError", "base_config", "field_docs"]
