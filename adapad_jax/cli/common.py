"""What every command does before its own work: a quiet start and config files found by preset name."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import adapad_jax

PRESET_FLAG = "--preset"
# absl's help flags; each prints its help and exits with status 1, which breaks `cmd --help && ...`.
HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")


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


def overridden_fields(argv: list[str]) -> list[str]:
    """The dotted config fields set by ``--config.<field>=<value>`` / ``--config.<field> <value>`` in ``argv``."""
    return [arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def config_dir() -> Path:
    """The directory of the shipped config files: ``adapad_jax/configs`` when installed, ``configs/`` in a checkout."""
    package = Path(adapad_jax.__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "demo.py").is_file():
            return candidate
    raise FileNotFoundError("the adapad_jax config files are not installed (adapad_jax/configs is missing)")


def presets() -> list[str]:
    """Names accepted by ``--preset``: the training config files directly in configs/, without ``.py`` (the study
    configs of launch/bilinear.py and launch/planted.py live in configs/studies/ and are not presets)."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_"))


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


def asked_for_help(argv: list[str]) -> bool:
    """``argv`` has one of absl's help flags (``--help``, ``-?``, ``--helpshort``, ``--helpfull``, ``--helpxml``)."""
    return any(arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in HELP_FLAGS for arg in argv[1:])


def help_exits_zero(parser: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
    """An absl ``flags_parser`` for ``app.run`` after which printing the help asked for exits 0 (absl exits 1)."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return parser(argv)
        except SystemExit as exit_:
            if exit_.code == 1 and asked_for_help(argv):
                sys.exit(0)
            raise

    return parse


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted field: value}`` of a (nested) ConfigDict, in its order."""
    fields: dict[str, Any] = {}
    for name, value in config.items():
        if hasattr(value, "items"):
            fields.update(flatten_config(value, f"{prefix}{name}."))
        else:
            fields[f"{prefix}{name}"] = value
    return fields


def describe_config(config: Any) -> str:
    """Every field of ``config`` as ``field = value  # what it means`` (the comments of ``base_config``)."""
    from adapad_jax.config.schema import field_docs

    docs = field_docs()
    order = {name: i for i, name in enumerate(docs)}  # the schema's order; fields it lacks after them
    fields = flatten_config(config)
    lines = []
    for name, value in sorted(fields.items(), key=lambda item: order.get(item[0], len(order))):
        doc = docs.get(name, "")
        lines.append(f"{name} = {value!r}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)


def run_app(main: Callable[[list[str]], None], module_name: str) -> None:
    """``absl.app.run(main)`` with ``--help`` showing ``module_name``'s docstring and flags (also from a console script)
    and exiting 0."""
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
    app.run(_finishing(main), flags_parser=help_exits_zero(parse_flags_or_fail))


def _finishing(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` that, once it returns (the outputs are complete), lets a late signal exit 0 quietly."""

    def run(argv: list[str]) -> None:
        result = main(argv)
        from adapad_jax.training.preemption import install_finished_handlers

        install_finished_handlers()
        return result

    return run
