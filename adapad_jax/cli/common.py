"""What every command does before its own work: a quiet start and config files found by preset name."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import adapad_jax

PRESET_FLAG = "--preset"
# Config files in configs/ that are not training runs (launch/bilinear.py reads bilinear.py).
_NOT_PRESETS = ("bilinear",)


def quiet_start() -> None:
    """Silence library start-up noise that says nothing about the run (transformers' "PyTorch was not found").

    transformers logs that banner through its own logger at import when torch is absent: set its verbosity
    to errors before it is imported (``TRANSFORMERS_VERBOSITY`` wins when the user sets it).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("transformers").setLevel(
        getattr(logging, os.environ["TRANSFORMERS_VERBOSITY"].upper(), logging.ERROR)
    )
    warnings.filterwarnings("ignore", message=r".*PyTorch.*TensorFlow.*Flax.*have been found.*")


def config_dir() -> Path:
    """The directory of the shipped config files: ``adapad_jax/configs`` when installed, ``configs/`` in a checkout."""
    package = Path(adapad_jax.__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "demo.py").is_file():
            return candidate
    raise FileNotFoundError("the adapad_jax config files are not installed (adapad_jax/configs is missing)")


def presets() -> list[str]:
    """Names accepted by ``--preset`` (the config files without ``.py``)."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_") and p.stem not in _NOT_PRESETS)


def preset_path(name: str) -> Path:
    """The config file of a preset; ValueError naming the choices for an unknown one."""
    path = config_dir() / f"{name}.py"
    if name not in presets():
        raise ValueError(f"unknown preset '{name}': choose one of {', '.join(presets())}")
    return path


def expand_preset(argv: list[str]) -> list[str]:
    """Rewrite ``--preset NAME`` / ``--preset=NAME`` into ``--config <packaged file>`` (before flag parsing)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == PRESET_FLAG or arg.startswith(PRESET_FLAG + "="):
            if "=" in arg:
                name = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                name, i = argv[i + 1], i + 1
            else:
                raise ValueError("--preset needs a name, e.g. --preset glue_cola")
            if any(a == "--config" or a.startswith("--config=") for a in argv):
                raise ValueError("give either --preset or --config, not both")
            out += ["--config", str(preset_path(name))]
        else:
            out.append(arg)
        i += 1
    return out


def run_app(main: Callable[[list[str]], None], module_name: str) -> None:
    """``absl.app.run(main)`` with ``--help`` showing ``module_name``'s docstring and flags (also from a console script)."""
    import sys

    from absl import app, flags

    from adapad_jax.cli.errors import parse_flags_or_fail

    module = sys.modules[module_name]
    main_module = sys.modules["__main__"]
    if main_module is not module:
        main_module.__doc__ = module.__doc__
        registered = {id(f) for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])}
        for flag in flags.FLAGS.get_key_flags_for_module(module_name):
            if id(flag) not in registered:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(_finishing(main), flags_parser=parse_flags_or_fail)


def _finishing(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` that, once it returns (the outputs are complete), lets a late signal exit 0 quietly."""

    def run(argv: list[str]) -> None:
        result = main(argv)
        from adapad_jax.training.preemption import install_finished_handlers

        install_finished_handlers()
        return result

    return run
