"""The planted-rank benchmark: rank-recovery measures against hand-computed values, the stop rule, and the
quick mode end to end (table structure, and every summary figure recomputed from the per-run files)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapad_jax.studies import planted as study
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "studies" / "planted.py"  # a study config, not a training preset


def _spearman_by_hand(x, y) -> float:
    """Pearson correlation of tie-averaged ranks (1-based), written out without scipy."""

    def ranks(values):
        values = np.asarray(values, float)
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(1, len(values) + 1)
        for v in np.unique(values):
            tie = values == v
            out[tie] = out[tie].mean()
        return out

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


def test_rank_recovery_hand_computed():
    planted, found = [0, 4, 0, 3], [1, 4, 2, 1]
    got = study.rank_recovery(planted, found)
    assert got["planted_fraction"] == pytest.approx(5 / 8)
    # Rank above the minimum (1): modules 1, 2 hold 3 and 1 of the 4 extra ranks; module 1 is planted.
    assert got["extra_on_planted"] == pytest.approx(3 / 4)
    # Tie-averaged ranks: planted (1.5, 4, 1.5, 3), found (1.5, 4, 3, 1.5) -> Pearson of those by hand.
    px, fy = np.array([1.5, 4, 1.5, 3]) - 2.5, np.array([1.5, 4, 3, 1.5]) - 2.5
    assert got["spearman"] == pytest.approx((px @ fy) / np.sqrt((px @ px) * (fy @ fy)))
    assert got["spearman"] == pytest.approx(_spearman_by_hand(planted, found))
    flat = study.rank_recovery(planted, [2, 2, 2, 2])
    assert np.isnan(flat["spearman"]) and np.isnan(flat["extra_on_planted"])
    assert flat["planted_fraction"] == pytest.approx(0.5)


def test_best_planted_fraction():
    # 3 planted modules could hold 3 x r_max 4 = 12, but the 5 unplanted ones keep rank 1: at most 11 of 16.
    assert study.best_planted_fraction([0, 4, 0, 0, 3, 0, 2, 0], 16, 4) == pytest.approx(11 / 16)
    assert study.best_planted_fraction([3, 0, 0, 2], 8, 4) == pytest.approx(6 / 8)


def test_stop_rule():
    assert not study.converged([1.0, 0.5, 0.4], patience=2, tolerance=0.01)  # nothing before the window yet
    assert not study.converged([1.0, 0.5, 0.4, 0.3], patience=2, tolerance=0.01)  # 0.3 is 25% below 0.4
    assert study.converged([1.0, 0.5, 0.4, 0.399, 0.41], patience=2, tolerance=0.01)  # < 1% better
    assert study.converged([1.0, 5e-5], patience=4, tolerance=0.01, floor=1e-4)  # teacher recovered


@pytest.mark.slow
def test_quick_benchmark_table_matches_its_runs(tmp_path):
    out = tmp_path / "planted"
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nkept text\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(REPO / "launch" / "planted.py"), "--config", str(CONFIG),
            "--config.quick=True", f"--config.output_dir={out}", f"--config.results_doc={doc}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    spec = importlib.util.spec_from_file_location("planted_config_default", CONFIG)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    variants = config_module.get_config().variants.split(",")  # the config's default list
    assert results["variants"] == variants and results["seeds"] == [0, 1]
    rows = results["rows"]
    assert [r["variant"] for r in rows] == variants
    budget = results["tasks"]["branches"]["budget"]
    for row in rows:
        runs = [r for r in results["records"] if r["variant"] == row["variant"]]
        assert sorted(r["seed"] for r in runs) == [0, 1]
        fractions, spearmans, totals, errors = [], [], [], []
        for rec in runs:
            run_dir = out / "runs" / "branches" / row["variant"] / f"seed{rec['seed']}"
            ranks = json.loads((run_dir / "ranks.json").read_text())
            planted = json.loads((run_dir / "planted.json").read_text())
            assert list(ranks) == list(planted)
            p, f = np.array([planted[k] for k in ranks]), np.array([ranks[k] for k in ranks])
            fractions.append(f[p > 0].sum() / f.sum())
            spearmans.append(_spearman_by_hand(p, f) if np.ptp(f) else np.nan)
            totals.append(f.sum())
            errors.append(rec["error"])
            # error is relative to the backbone's (1.0): every variant learns a good part of the planted delta
            assert 0 < rec["error"] < 0.8 and rec["steps"] <= 60 and rec["seconds_per_step"] > 0
            assert rec["curve"] and all(c["step"] % 10 == 0 for c in rec["curve"])
        assert row["planted_fraction"] == pytest.approx(np.mean(fractions))
        assert row["total_rank"] == pytest.approx(np.mean(totals))
        assert row["error"] == pytest.approx(np.mean(errors))
        assert row["error_std"] == pytest.approx(np.std(errors, ddof=1))
        if np.all(np.isnan(spearmans)):
            assert row["spearman"] is None  # NaN is written as null
        else:
            assert row["spearman"] == pytest.approx(np.nanmean(spearmans))
        if row["variant"] in ("lora", "adapad_fixed_rank"):
            assert all(t == budget for t in totals)  # rank 2 in each of the 4 modules
        else:
            assert all(t <= budget for t in totals)
    # What RESULTS.md claims, in kind: adapad's error well below the backbone's, and its share of the rank on the
    # planted modules the best any allocation can reach, clearly above fixed-rank LoRA's (rank 2 everywhere).
    by_variant = {row["variant"]: row for row in rows}
    best = results["tasks"]["branches"]["best_planted_fraction"]
    assert by_variant["adapad"]["error"] < 0.7
    task = results["tasks"]["branches"]
    lora_share = sum(p > 0 for p in task["planted"]) * task["lora_rank"] / budget
    assert by_variant["lora"]["planted_fraction"] == pytest.approx(lora_share)
    assert by_variant["adapad"]["planted_fraction"] == pytest.approx(best)
    assert by_variant["adapad"]["planted_fraction"] >= by_variant["lora"]["planted_fraction"] + 0.2
    assert by_variant["adapad"]["planted_fraction"] > by_variant["adapad_uniform"]["planted_fraction"]
    # The markdown table: a header and one line per variant, its error column from the rows above.
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | held-out error")
    for row, line in zip(rows, table[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["variant"]
        assert cells[1] == f"{row['error']:.4f} ± {row['error_std']:.4f}"
    assert "python launch/planted.py" in summary
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept text") and summary.strip() in text


@pytest.mark.parametrize("override, message", [
    ("--config.variants=adapad,nope", "error: variants: unknown ['nope']"),
    ("--config.tasks=nope", "error: tasks: unknown task 'nope'"),
    ("--config.stop.eval_every=0", "error: stop.eval_every=0 must be >= 1"),
])
def test_bad_input_stops_before_any_run(tmp_path, override, message):
    out = tmp_path / "never"
    args = [sys.executable, str(REPO / "launch" / "planted.py"), "--config", str(CONFIG),
            override, f"--config.output_dir={out}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-500:]
    assert not out.exists()


def test_comparison_methods_follow_adapads_allocation_schedule():
    adapter = dict(study.STUDY_ADAPTER)
    # 8 modules from rank 1 to 16, one promotion per T = 20 after the warm-up round: the last at 20 * (1 + 8).
    assert study.allocation_step(adapter, 8) == 180
    assert study.allocation_step({**adapter, "rank_budget": 8, "growth_interval": 5}, 4) == 25  # the quick mode
    adalora = study.method_overrides("adalora", adapter, 8, 2000)
    assert adalora == {"adapter.adalora.tinit": 20, "adapter.adalora.tfinal": 1820, "adapter.adalora.deltaT": 10}
    # A smoke run shorter than the schedule keeps a quarter of the run on each side of the decay.
    assert study.method_overrides("adalora", adapter, 8, 12) == {
        "adapter.adalora.tinit": 3, "adapter.adalora.tfinal": 3, "adapter.adalora.deltaT": 10}
    assert study.method_overrides("ardlora", adapter, 8, 2000) == {"adapter.initial_rank": 2}  # r0 = LoRA's rank
    assert study.method_overrides("increlora", adapter, 8, 2000) == {"adapter.increlora.incre_rank_num": 1}
    config = study.study_config(adapter, study.STUDY_OPTIM, "adalora", 0, 2000, 8)
    assert (config.adapter.method, config.adapter.rank_budget, config.adapter.r_max) == ("adalora", 16, 4)
    assert (config.adapter.adalora.tinit, config.adapter.adalora.tfinal) == (20, 1820)
    # A diagnostic's own value wins over the study's METHOD_SETTINGS.
    xi = study.study_config(adapter, study.STUDY_OPTIM, "sora_xi_6e-3", 0, 2000, 8).adapter.sora.sparse_lambda_2
    assert xi == 6e-3 and study.METHOD_SETTINGS["sora"]["adapter.sora.sparse_lambda_2"] != 6e-3


@pytest.mark.parametrize("variant, step, total, done", [
    ("lora", 1, 16, True), ("adapad_fixed_rank", 1, 16, True),
    ("adapad", 500, 15, False), ("joint", 41, 16, True),
    ("adalora", 179, 16, False), ("adalora", 180, 16, True),  # the mask freezes at 2000 - tfinal 1820
    ("sora", 179, 30, False), ("ardlora", 179, 16, False), ("ardlora", 180, 20, True),  # adapad's last growth
])
def test_allocation_done(variant, step, total, done):
    config = study.study_config(study.STUDY_ADAPTER, study.STUDY_OPTIM, variant, 0, 2000, 8)
    assert study.allocation_done(config, step, total, 8) is done


OLD_BLOCK = """
Command: `python launch/planted.py --old` (2026-11-29 22:21 UTC, 2 runs).

### branches

Task text.

| variant | error | ms / step |
|---|---|---|
| adapad | 0.1 | 1.0 |
| lora | 0.2 | 2.0 |

### Diagnostics

#### branches

Task text.

| variant | error | ms / step |
|---|---|---|
| adapad_lr_3e-3 | 0.3 | 3.0 |
"""

NEW_BLOCK = """Runs (the last column of each table names the run a row comes from):

- A: Command: `python launch/planted.py --new` (2026-12-02).

### branches

Task text.

| variant | error | ms / step | run |
|---|---|---|---|
| lora | 0.25 | 2.5 | A |
| sora | 0.5 | 5.0 | A |

### residual

Residual text.

| variant | error | ms / step | run |
|---|---|---|---|
| sora | 0.6 | 6.0 | A |
"""


def test_merge_summaries_replaces_and_appends_rows_naming_their_run():
    merged = study.merge_summaries(OLD_BLOCK, NEW_BLOCK)
    lines = merged.splitlines()
    assert "- A: Command: `python launch/planted.py --old` (2026-11-29 22:21 UTC, 2 runs)." in lines
    assert "- B: Command: `python launch/planted.py --new` (2026-12-02)." in lines
    branches = lines[lines.index("### branches"):lines.index("### residual")]
    assert [line for line in branches if line.startswith("| ") and "---" not in line] == [
        "| variant | error | ms / step | run |", "| adapad | 0.1 | 1.0 | A |", "| lora | 0.25 | 2.5 | B |",
        "| sora | 0.5 | 5.0 | B |"]
    # A task the old block lacks goes before the diagnostics, which keep their rows and run.
    assert lines.index("### residual") < lines.index("### Diagnostics")
    assert "| sora | 0.6 | 6.0 | B |" in lines and "| adapad_lr_3e-3 | 0.3 | 3.0 | A |" in lines
    # Merging the same run again replaces its rows; run A keeps the rows nothing replaced, a run with none left goes.
    again = study.merge_summaries(merged, NEW_BLOCK.replace("--new", "--newer"))
    assert "--new`" not in again and "- C: Command: `python launch/planted.py --newer`" in again
    assert "| lora | 0.25 | 2.5 | C |" in again and "| adapad | 0.1 | 1.0 | A |" in again
    with pytest.raises(ValueError, match="other task settings"):
        study.merge_summaries(OLD_BLOCK, NEW_BLOCK.replace("Task text.", "Quick task text."))


def test_preflight_refuses_a_method_that_cannot_start(monkeypatch, tmp_path):
    """An unwired method (or settings it refuses) stops the benchmark before any run, with its own line."""
    import importlib.util

    from adapad_jax.methods import registry
    from adapad_jax.runtime.failures import ConfigError

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    launcher = load("planted_launcher", REPO / "launch" / "planted.py")
    config = load("planted_config", CONFIG).get_config()
    task = launcher.parse_tasks(config)[0]
    launcher.preflight(config, [(task, "joint"), (task, "lora")])

    class Refuses(registry.METHOD_CLASSES["joint"]):
        def make_setup(self, settings, num_modules, components):
            raise ConfigError("adapter.method=sora: refused for the test")

    monkeypatch.setitem(registry.METHOD_CLASSES, "sora", Refuses)
    with pytest.raises(ConfigError, match="refused for the test"):
        launcher.preflight(config, [(task, "joint"), (task, "sora")])
