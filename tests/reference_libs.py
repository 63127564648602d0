"""The PyTorch-side reference libraries (torch, peft from the test extra) that parity and export checks compare
against: without them those checks skip locally, but under CI (``CI`` set, as CI services do) a missing one
fails the run instead of silently skipping the checks that matter most."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    """Whether the tests run under CI (``CI`` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def import_reference(name: str) -> ModuleType:
    """Import reference library ``name``; skip the calling module without it, or fail under CI."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if in_ci():
            pytest.fail(f"reference library {name!r} is missing under CI ({err}); install the test extra: "
                        "pip install -e '.[test]'", pytrace=False)
        pytest.skip(f"reference library {name!r} is not installed (pip install -e '.[test]')",
                    allow_module_level=True)
