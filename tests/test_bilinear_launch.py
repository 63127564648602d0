"""Smoke test of launch/bilinear.py: quick mode writes the results.json schema, figures and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "studies" / "bilinear.py"  # a study config, not a training preset
METHODS = {"parallel_als", "sequential_als", "parallel_gd", "sequential_gd", "joint_gd"}


def _launch(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    command = [sys.executable, str(ROOT / "launch" / "bilinear.py"), "--config", str(CONFIG),
               *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _is_series(values, rounds):
    return len(values) == rounds and all(v is None or isinstance(v, float) for v in values)


def test_quick_run_writes_schema_figures_and_summary(tmp_path):
    experiments = "convergence_exponential,self_correction,noise_0.1,rate_fit,gap_0.1"
    done = _launch("--config.quick=True", "--config.seeds=2", "--config.seed=3",
                   f"--config.experiments={experiments}", f"--config.output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["experiments"]) == set(experiments.split(","))
    assert set(results["experiments"]["convergence_exponential"]) == METHODS
    for name, methods in results["experiments"].items():
        for method, runs in methods.items():
            assert method in METHODS
            assert [run["seed"] for run in runs] == [3, 4]
            for run in runs:
                rounds = len(run["rel_weight_error"])
                assert rounds > 0 and all(isinstance(v, float) for v in run["rel_weight_error"]), (name, method)
                assert len(run["workers"]) == 4
                for worker in run["workers"]:
                    assert set(worker) >= {"mismatch", "numerical", "total"}
                    assert all(_is_series(worker[f], rounds) for f in ("mismatch", "numerical", "total"))
    # Staggered activation: worker k (1-based) is null before round k - 1 in parallel mode.
    parallel = results["experiments"]["self_correction"]["parallel_als"][0]["workers"]
    for k, worker in enumerate(parallel):
        assert all(v is None for v in worker["mismatch"][:k]) and worker["mismatch"][k] is not None
    for figure in ("fig2_convergence", "fig3_self_correction", "fig4_noise", "fig5_rate_fit", "fig6_gap"):
        path = tmp_path / f"{figure}.png"
        assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert "| convergence_exponential | parallel_als |" in summary and summary in done.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.experiments=convergence_cubic", "unknown experiment(s) convergence_cubic"),
        ("--config.seeds=0", "seeds must be >= 1"),
        ("--config.noise.levels=0.1,abc", "bad noise.levels"),
        ("--config.convergence.methods=parallel_als,lbfgs", "unknown method 'lbfgs'"),
    ],
)
def test_bad_config_stops_before_compute_with_one_line(tmp_path, override, message):
    done = _launch(override, f"--config.output_dir={tmp_path / 'out'}", timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "out").exists()


def test_advance_learning_study_runs_on_and_off_with_stagger(tmp_path):
    """Quick advance-learning study in-process: both arms, analysis, summary table and Fig. 7."""
    import importlib.util

    from adapad_jax.bilinear import plots, studies

    spec_file = importlib.util.spec_from_file_location("bilinear_config", CONFIG)
    module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    config = module.get_config()
    config.quick, config.experiments = True, "advance_learning"
    config.advance_learning.methods = "parallel_als"
    (spec,) = studies.build_experiments(config)
    assert spec.methods == ("parallel_als:advance_on", "parallel_als:advance_off")
    assert {s.stagger for s in spec.settings.values()} == {3}
    experiments = {spec.name: studies.run_experiment(spec, [0, 1])}
    analysis = studies.analyse([spec], experiments)["advance_learning"]
    on, off = analysis["parallel_als:advance_on"], analysis["parallel_als:advance_off"]
    assert [w["activation_round"] for w in on["workers"]] == [0, 3, 6, 9]
    assert on["advance_learning"] and not off["advance_learning"]
    # Worker 1 has no predecessor, so nothing to learn in advance: identical; later workers differ.
    assert on["workers"][0]["total_at_activation"] == off["workers"][0]["total_at_activation"]
    assert on["workers"][-1]["total_at_activation"] < off["workers"][-1]["total_at_activation"]
    summary = studies.summary_markdown([spec], experiments, {"advance_learning": analysis})
    assert "| parallel_als:advance_off | 3 | 4 | 9 |" in summary
    (figure,) = plots.plot_all([spec], experiments, {"advance_learning": analysis}, tmp_path)
    assert figure.name == "fig7_advance_learning.png" and figure.stat().st_size > 10_000
    config.advance_learning.stagger = 1
    with pytest.raises(ValueError, match="advance_learning.stagger must be >= 2"):
        studies.build_experiments(config)
