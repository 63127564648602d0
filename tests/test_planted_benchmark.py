"""The planted-rank benchmark: rank-recovery measures against hand-computed values, the stop rule, and the
quick mode end to end (table structure, and every summary figure recomputed from the per-run files)."""

from __future__ import annotations

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
    variants = list(study.VARIANTS)
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
