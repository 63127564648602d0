"""The installed commands: a wheel built from this tree runs adapad-train / -export / -predict outside the checkout,
finds its config files by --preset, and starts quietly (no transformers banner when torch is absent).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from adapad_jax.cli.common import expand_preset, presets

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("adapad-train", "adapad-export", "adapad-predict")
BANNER = "PyTorch was not found"


def test_every_package_ships_with_the_configs():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "adapad_jax").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"adapad_jax.configs"}
    assert setuptools["package-dir"] == {"adapad_jax.configs": "configs"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)


def test_preset_expands_to_the_config_file():
    assert "glue_cola" in presets() and "squad_v2" in presets() and "bilinear" not in presets()
    argv = expand_preset(["adapad-train", "--preset", "glue_cola", "--config.seed=1"])
    assert argv[1] == "--config" and Path(argv[2]).read_text() == (REPO / "configs" / "glue_cola.py").read_text()
    assert argv[3:] == ["--config.seed=1"]
    assert expand_preset(["x", "--preset=squad"])[2].endswith("squad.py")
    with pytest.raises(ValueError, match="unknown preset 'nope': choose one of"):
        expand_preset(["x", "--preset", "nope"])
    with pytest.raises(ValueError, match="either --preset or --config"):
        expand_preset(["x", "--preset", "demo", "--config", "configs/demo.py"])


def test_study_configs_are_not_offered_as_training_presets():
    """configs/studies/ holds the configs of the study launchers; --preset offers only configs of a training run."""
    import importlib.util

    from adapad_jax.config.schema import TASK_NAMES

    studies = sorted(p.stem for p in (REPO / "configs" / "studies").glob("*.py"))
    assert studies == ["bilinear", "planted"]
    assert not set(studies) & set(presets()), presets()
    with pytest.raises(ValueError, match="^unknown preset 'planted': choose one of custom, demo, "):
        expand_preset(["x", "--preset", "planted"])
    for name in presets():  # each preset is a run config of a known task (a study config has no task)
        spec = importlib.util.spec_from_file_location(f"preset_{name}", expand_preset(["x", f"--preset={name}"])[2])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.get_config().task in TASK_NAMES, name
    for launcher in ("bilinear", "planted", "planted_head_drift"):  # the study launchers name configs that exist
        named = set(re.findall(r"configs/[\w/]+\.py", (REPO / "launch" / f"{launcher}.py").read_text()))
        assert named and all((REPO / path).is_file() for path in named), (launcher, named)


_BLOCK_TORCH = """
import importlib.abc, importlib.util, sys

_find_spec = importlib.util.find_spec


def _blocked(name):
    return name == "torch" or name.startswith("torch.")


def find_spec(name, package=None):
    return None if _blocked(name) else _find_spec(name, package)


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


importlib.util.find_spec = find_spec
sys.meta_path.insert(0, _NoTorch())
"""


def _torch_blocker(directory: Path) -> Path:
    """A sitecustomize that makes ``torch`` unimportable, as on a machine without PyTorch."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_BLOCK_TORCH)
    return directory


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The project built as a wheel from a copy of this tree and installed with --target into a temp dir."""
    root = tmp_path_factory.mktemp("pkg")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                               ".venv", "dist"))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("adapad_jax-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    workdir = root / "elsewhere"
    workdir.mkdir()
    return {"target": target, "bin": target / "bin", "workdir": workdir, "root": root}


def _env(installed: dict[str, Path], *extra: Path) -> dict[str, str]:
    # TRANSFORMERS_VERBOSITY too: a test that imported the CLI in this process (quiet_start) may have set it.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRANSFORMERS_VERBOSITY")}
    env["PYTHONPATH"] = os.pathsep.join([str(installed["target"]), *map(str, extra)])
    return env


@pytest.mark.slow
def test_installed_commands_run_outside_the_checkout(installed):
    env = _env(installed, _torch_blocker(installed["root"] / "blocker"))
    where = subprocess.run([sys.executable, "-c", "import adapad_jax; print(adapad_jax.__file__)"], env=env,
                           cwd=installed["workdir"], capture_output=True, text=True, timeout=60, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed["target"])  # not the checkout
    for command, flag in zip(COMMANDS, ("--preset", "--merged", "--run_dir")):
        helped = subprocess.run([str(installed["bin"] / command), "--help"], env=env, cwd=installed["workdir"],
                                capture_output=True, text=True, timeout=120)
        # absl exits with 1 after --help
        assert helped.returncode in (0, 1) and flag in helped.stdout and not helped.stderr, (command, helped.stderr)
    for module, flag in (("adapad_jax.cli.train", "--preset"), ("adapad_jax.cli.predict", "--run_dir")):
        helped = subprocess.run([sys.executable, "-m", module, "--help"], env=env, cwd=installed["workdir"],
                                capture_output=True, text=True, timeout=120)
        assert helped.returncode in (0, 1) and flag in helped.stdout and not helped.stderr, (module, helped.stderr)


@pytest.mark.slow
def test_installed_train_preset_runs_quietly_without_torch(installed):
    from adapad_jax.testing import tiny

    root = installed["root"]
    tiny.build_tiny_deberta(root / "ckpt", task="classification", num_labels=2, seed=1)
    files = tiny.write_tiny_glue(root / "data", "glue_rte", n_train=8, n_val=8)
    blocker = _torch_blocker(root / "blocker")
    env = _env(installed, blocker)
    control = subprocess.run([sys.executable, "-c", "import transformers"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert BANNER in control.stderr  # without the CLI's quiet start transformers prints its banner here
    result = subprocess.run(
        [str(installed["bin"] / "adapad-train"), "--preset", "glue_rte",
         f"--config.model.name_or_path={root / 'ckpt'}", f"--config.data.train_file={files.train_file}",
         f"--config.data.validation_file={files.validation_file}", "--config.data.max_length=32",
         "--config.train.num_steps=0", "--config.train.eval_batch_size=8", "--config.adapter.rank_budget=100",
         "--config.output_dir=run"],
        env=env, cwd=installed["workdir"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert BANNER not in result.stderr and "[transformers]" not in result.stderr, result.stderr
    assert (installed["workdir"] / "run" / "eval_results.json").is_file()
    assert (installed["workdir"] / "run" / "adapter" / "README.md").is_file()
