"""The package tree shows the architecture (issue 19): no loose modules, no upward import, no test scaffolding."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapad_jax"
ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
# Lowest first: a module may import its own package and the packages before it, never one after it.
LAYERS = ("runtime", "data", "config", "adapters", "models", "metrics", "outputs", "methods", "training", "run",
          "testing", "studies", "bilinear", "cli")
# Upward imports still there (each must be a function-level import with a reason here); new ones fail the test.
KNOWN_UPWARD: set[tuple[str, str]] = set()
# Only the studies may use the toy model and tiny checkpoints of adapad_jax/testing.
MAY_IMPORT_TESTING = ("testing", "studies")


def imported_packages(path: Path) -> set[str]:
    """The adapad_jax sub-packages a module imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adapad_jax"):
            names = [node.module] if node.module != "adapad_jax" else [f"adapad_jax.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("adapad_jax.")}
    return found


def package_modules() -> dict[str, set[str]]:
    """Each module under adapad_jax/ (its path inside the package) -> the sub-packages it imports."""
    return {path.relative_to(PACKAGE).as_posix(): imported_packages(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_loose_modules():
    loose = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py"], loose


def test_every_package_has_a_layer():
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS), packages ^ set(LAYERS)


def test_no_import_points_up():
    upward = {(module, target) for module, targets in package_modules().items() for target in targets
              if target in LAYERS and LAYERS.index(target) > LAYERS.index(module.split("/")[0])}
    assert upward - KNOWN_UPWARD == set(), sorted(upward - KNOWN_UPWARD)
    assert KNOWN_UPWARD - upward == set(), f"fixed, drop from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - upward)}"


def test_library_never_imports_test_scaffolding():
    offenders = sorted(module for module, targets in package_modules().items()
                       if "testing" in targets and module.split("/")[0] not in MAY_IMPORT_TESTING)
    assert offenders == [], offenders


def test_architecture_states_the_layer_order():
    section = re.search(r"^## Layers\n(.*?)^## ", ARCHITECTURE.read_text(), flags=re.M | re.S)
    assert section, "docs/ARCHITECTURE.md has no '## Layers' section"
    order = re.search(r"^`\w+`(?: →\s+`\w+`)+", section.group(1), flags=re.M)
    assert order, "the Layers section has no `a` → `b` → ... line"
    assert re.findall(r"`(\w+)`", order.group(0)) == list(LAYERS)
