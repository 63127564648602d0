"""How the commands fail: one ``error: ...`` line on stderr and an exit code (docs/TROUBLESHOOTING.md).

Bad input (config, model, data) exits 2; run-time failures (divergence, preemption, unwritable outputs) exit
with their own code from ``adapad_jax.runtime.failures``; anything else is a crash with a traceback (exit 1).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any

from adapad_jax.config.schema import ConfigError
from adapad_jax.runtime.distributed import await_peer_verdict, initialize_distributed
from adapad_jax.runtime.failures import RunFailure


def start_command(argv: list[str], hint: str = "") -> None:
    """Shared start of the launch scripts: refuse positional arguments, quiet absl, start jax.distributed if asked."""
    from absl import logging

    if len(argv) > 1:
        fail(f"unexpected positional arguments {argv[1:]}{hint}")
    logging.set_verbosity(logging.WARNING)
    with user_errors():
        initialize_distributed()  # before anything touches a device


def fail(message: str, code: int = 2) -> None:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags_or_fail(argv: list[str]) -> list[str]:
    """absl flag parsing for ``app.run`` that reports a bad flag or config override as one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err)
        if "Traceback (most recent call last)" in message:  # get_config raised: keep the flag and the last line
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            message = f"{message.split(':', 1)[0]}: the config file raised {lines[-1]}"
        fail(message)
    except (AttributeError, KeyError) as err:
        fail(unknown_field_message(argv, err))
    except Exception as err:  # noqa: BLE001 - a config file that fails to load raises anything
        fail(config_load_message(err))
    raise AssertionError("unreachable")


def config_load_message(err: BaseException) -> str:
    """One line for a config file that could not be loaded (missing, or raising in get_config)."""
    message = str(err)
    if "No such file or directory:" in message:
        return f"config file not found: {message.split('No such file or directory:')[-1].strip()}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"cannot load the config file: {' '.join(lines[-3:]) if lines else type(err).__name__}"


def loaded_config_or_fail(config: Any) -> Any:
    """config_flags reports a config file that failed to load only when the config is first read: do it here."""
    try:
        config.get("task")
    except OSError as err:
        fail(config_load_message(err))
    return config


def unknown_field_message(argv: list[str], err: BaseException) -> str:
    """Name the ``--config.<field>`` override that does not exist (config_flags only reports the last key)."""
    text = str(err.args[0] if err.args else err).replace("\\'", "'")
    named = re.search(r"[\"']([A-Za-z_]\w*)[\"']", text)
    missing = named.group(1) if named else text
    suggestion = re.search(r"Did you mean \"?(\w+)\"?", text)
    hint = f" (did you mean \"{suggestion.group(1)}\" instead?)" if suggestion else ""
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        parts = name.split(".")
        if len(parts) > 1 and parts[0] != "" and missing in parts[1:]:
            field = ".".join(parts[1:])
            return f"unknown config field '{field}'{hint}; the fields are listed in adapad_jax/config/schema.py:base_config"
    return f"unknown config field '{missing}'{hint}"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (config, model, data), reported without a traceback."""
    from adapad_jax.data.tasks import DataError
    from adapad_jax.models.checkpoint_io import CheckpointError

    types: list[type[BaseException]] = [ConfigError, DataError, CheckpointError]
    try:
        from adapad_jax.models.qwen3_modules import Qwen3ConfigError

        types.append(Qwen3ConfigError)
    except ImportError:
        pass
    return tuple(types)


@contextlib.contextmanager
def user_errors():
    """Turn bad-input exceptions raised inside the block into ``fail`` (one line, exit code 2), and run-time
    failures (divergence, preemption, unwritable outputs) into one line with their own exit code."""
    known = user_error_types()
    try:
        yield
    except known as err:
        fail(str(err))
    except RunFailure as err:
        fail(str(err), err.exit_code)
    except Exception as err:
        await_peer_verdict(err)  # a collective that lost its peer process: the watch names it (exit 69)
        raise
