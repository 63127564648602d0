"""config.compilation_cache_dir: default location, "" = off, bad type refused, and JAX really writes there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapad_jax.runtime.compilation_cache import CACHE_ENV_VAR, default_cache_dir, enable_persistent_cache
from adapad_jax.config.schema import ConfigError, base_config
from adapad_jax.config.validation import check_fields

REPO = Path(__file__).resolve().parents[1]


def test_default_is_the_env_var_else_the_user_cache(monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, "/somewhere/cache")
    assert default_cache_dir() == "/somewhere/cache"
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == os.path.join("/xdg", "adapad_jax", "jax_compilation")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "adapad_jax", "jax_compilation")


def test_empty_turns_it_off_and_a_bad_type_is_refused():
    assert enable_persistent_cache("") is False
    config = base_config()
    config.output_dir = "x"
    with config.ignore_type():
        config.compilation_cache_dir = 3
    with pytest.raises(ConfigError, match="compilation_cache_dir must be str"):
        check_fields(config)


def test_a_compiled_program_lands_in_the_cache_dir(tmp_path):
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from adapad_jax.runtime.compilation_cache import enable_persistent_cache
        assert enable_persistent_cache({str(tmp_path / "cache")!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        print(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum())
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((tmp_path / "cache").iterdir())
