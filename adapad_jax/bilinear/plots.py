"""PNG figures in the spirit of the paper's Figures 2-6 (median over seeds, min-max band)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from adapad_jax.bilinear.studies import FIT_FLOOR, ExperimentSpec, series_array  # noqa: E402

COLORS = {
    "parallel_als": "tab:blue", "sequential_als": "tab:orange", "parallel_gd": "tab:green",
    "sequential_gd": "tab:red", "joint_gd": "tab:purple",
}


def _band(ax, values: np.ndarray, label: str, color=None, linestyle="-") -> None:
    """Median line with a min-max band over the seed axis (rows), skipping all-NaN rounds."""
    rounds = np.arange(values.shape[1])
    valid = np.any(np.isfinite(values), axis=0)
    if not valid.any():
        return
    with np.errstate(all="ignore"):
        med = np.nanmedian(values[:, valid], axis=0)
        low, high = np.nanmin(values[:, valid], axis=0), np.nanmax(values[:, valid], axis=0)
    line, = ax.plot(rounds[valid], med, label=label, color=color, linestyle=linestyle)
    ax.fill_between(rounds[valid], low, high, color=line.get_color(), alpha=0.2)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_convergence(specs: list[ExperimentSpec], experiments: dict, out: Path) -> Path | None:
    """Fig. 2: relative weight error per round on each spectrum, every method."""
    chosen = [s for s in specs if s.group == "convergence"]
    if not chosen:
        return None
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), squeeze=False)
    for ax, spec in zip(axes[0], chosen):
        for method, runs in experiments[spec.name].items():
            _band(ax, series_array(runs, "rel_weight_error"), method, COLORS.get(method))
        ax.set(yscale="log", xlabel="round", ylabel="relative weight error", title=spec.name)
        ax.legend(fontsize=8)
    return _save(fig, out / "fig2_convergence.png")


def plot_self_correction(specs: list[ExperimentSpec], experiments: dict, out: Path) -> Path | None:
    """Fig. 3: mismatch per worker (parallel solid, sequential dashed); error decomposition of worker 3."""
    spec = next((s for s in specs if s.group == "self_correction"), None)
    if spec is None:
        return None
    runs = experiments[spec.name]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    workers = len(spec.singular_values)
    cmap = plt.get_cmap("viridis")
    for method, style in (("parallel_als", "-"), ("sequential_als", "--")):
        if method not in runs:
            continue
        for k in range(workers):
            _band(left, series_array(runs[method], "mismatch", k), f"{method} worker {k + 1}",
                  cmap(k / max(workers - 1, 1)), style)
    left.set(yscale="log", xlabel="round", ylabel="deflation mismatch / ||W* X||", title="self-correction")
    left.legend(fontsize=7)
    worker = min(2, workers - 1)
    if "parallel_als" in runs:
        for field in ("numerical", "mismatch", "total"):
            _band(right, series_array(runs["parallel_als"], field, worker), field)
    right.set(yscale="log", xlabel="round", ylabel="error / ||W* X||", title=f"parallel ALS, worker {worker + 1}")
    right.legend(fontsize=8)
    return _save(fig, out / "fig3_self_correction.png")


def plot_noise(specs: list[ExperimentSpec], experiments: dict, analysis: dict, out: Path) -> Path | None:
    """Fig. 4: parallel vs sequential ALS at each noise level, with the reference noise scale."""
    chosen = [s for s in specs if s.group == "noise"]
    if not chosen:
        return None
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.8), squeeze=False)
    for ax, spec in zip(axes[0], chosen):
        for method, runs in experiments[spec.name].items():
            _band(ax, series_array(runs, "rel_weight_error"), method, COLORS.get(method))
        reference = analysis.get("noise", {}).get(spec.name, {}).get("reference_floor")
        if reference:
            ax.axhline(reference, color="gray", linestyle=":", label="noise reference scale")
        ax.set(yscale="log", xlabel="round", ylabel="relative weight error", title=f"noise {spec.noise:g}")
        ax.legend(fontsize=7)
    return _save(fig, out / "fig4_noise.png")


def plot_rate_fit(specs: list[ExperimentSpec], experiments: dict, analysis: dict, out: Path) -> Path | None:
    """Fig. 5: (A) per-worker total error with fitted exponentials, (B) warm-up vs activation, (C) rates."""
    spec = next((s for s in specs if s.group == "rate_fit"), None)
    if spec is None or "rate_fit" not in analysis:
        return None
    runs = experiments[spec.name]["parallel_als"]
    rows = analysis["rate_fit"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("viridis")
    for row in rows:
        k = row["worker"] - 1
        color = cmap(k / max(len(rows) - 1, 1))
        total = series_array(runs, "total", k)
        _band(a, total, f"worker {k + 1}", color)
        if row["rate_median"] is not None:
            start = row["activation_round"]
            with np.errstate(all="ignore"):
                anchor = np.nanmedian(total[:, start])
            t = np.arange(start, total.shape[1])
            fitted = anchor * row["rate_median"] ** (t - start)
            above_floor = fitted > 0.1 * FIT_FLOOR  # the fit ignores the round-off floor; so does the plot
            a.plot(t[above_floor], fitted[above_floor], color=color, linestyle=":", linewidth=1)
    a.set(yscale="log", xlabel="round", ylabel="total error / ||W* X||", title="(A) total error and fitted rates")
    a.legend(fontsize=7)
    workers = [row["worker"] for row in rows]
    b.plot(workers, [row["activation_round"] for row in rows], "k--", label="staggered activation s_k")
    for row in rows:
        seeds_w = [w for w in row["warmup_per_seed"] if w is not None]
        b.scatter([row["worker"]] * len(seeds_w), seeds_w, color="tab:blue", alpha=0.5)
    b.plot(workers, [row["warmup_median"] if row["warmup_median"] is not None else np.nan for row in rows],
           "o-", color="tab:blue", label="empirical warm-up (median)")
    b.set(xlabel="worker k", ylabel="round", title="(B) warm-up vs activation")
    b.legend(fontsize=8)
    c.plot(workers, [row["rate_median"] if row["rate_median"] is not None else np.nan for row in rows],
           "o-", label="fitted (median)")
    for row in rows:
        seeds_r = [r for r in row["rate_per_seed"] if r is not None]
        c.scatter([row["worker"]] * len(seeds_r), seeds_r, color="tab:blue", alpha=0.4)
    c.plot(workers, [row["predicted_rate"] for row in rows], "s--", label="max_{j<=k} (s_{j+1}/s_j)^(2T)")
    c.set(xlabel="worker k", ylabel="per-round contraction", title="(C) fitted vs predicted rate")
    c.legend(fontsize=8)
    return _save(fig, out / "fig5_rate_fit.png")


def plot_gap(specs: list[ExperimentSpec], experiments: dict, out: Path) -> Path | None:
    """Fig. 6: (a) convergence per gap delta, (b) final error against delta."""
    chosen = [s for s in specs if s.group == "gap"]
    if not chosen:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("plasma")
    finals: dict[str, list[tuple[float, np.ndarray]]] = {}
    for i, spec in enumerate(chosen):
        for method, runs in experiments[spec.name].items():
            errors = series_array(runs, "rel_weight_error")
            _band(a, errors, f"{method} delta={spec.parameter:g}", cmap(i / max(len(chosen), 1)))
            finals.setdefault(method, []).append((spec.parameter, errors[:, -1]))
    a.set(yscale="log", xlabel="round", ylabel="relative weight error", title="(a) convergence by spectral gap")
    a.legend(fontsize=7)
    for method, points in finals.items():
        points.sort()
        deltas = [p[0] for p in points]
        b.plot(deltas, [np.median(p[1]) for p in points], "o-", label=method)
        b.fill_between(deltas, [p[1].min() for p in points], [p[1].max() for p in points], alpha=0.2)
    b.set(yscale="log", xlabel="gap delta", ylabel="final relative weight error", title="(b) final error vs gap")
    b.legend(fontsize=8)
    return _save(fig, out / "fig6_gap.png")


def plot_advance_learning(specs: list[ExperimentSpec], experiments: dict, out: Path) -> Path | None:
    """Advance learning on (solid) vs off (dashed): (a) per-worker total error, (b) relative weight error."""
    spec = next((s for s in specs if s.group == "advance_learning"), None)
    if spec is None:
        return None
    runs = experiments[spec.name]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    first = spec.methods[0].split(":")[0]
    cmap = plt.get_cmap("viridis")
    for label, method_runs in runs.items():
        method, mode = label.split(":")
        style = "-" if mode == "advance_on" else "--"
        if method == first:
            workers = len(method_runs[0]["workers"])
            for k in range(workers):
                _band(a, series_array(method_runs, "total", k), f"worker {k + 1} {mode}", cmap(k / max(workers, 1)),
                      style)
        _band(b, series_array(method_runs, "rel_weight_error"), label, COLORS.get(method), style)
    stagger = spec.settings[spec.methods[0]].stagger
    a.set(yscale="log", xlabel="round", ylabel="worker total error",
          title=f"(a) {first}, stagger {stagger}: solid on, dashed off")
    a.legend(fontsize=6, ncol=2)
    b.set(yscale="log", xlabel="round", ylabel="relative weight error", title="(b) advance learning on vs off")
    b.legend(fontsize=7)
    return _save(fig, out / "fig7_advance_learning.png")


def plot_all(specs: list[ExperimentSpec], experiments: dict, analysis: dict[str, Any], out: Path) -> list[Path]:
    """Every figure that the chosen experiments allow; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_convergence(specs, experiments, out),
        plot_self_correction(specs, experiments, out),
        plot_noise(specs, experiments, analysis, out),
        plot_rate_fit(specs, experiments, analysis, out),
        plot_gap(specs, experiments, out),
        plot_advance_learning(specs, experiments, out),
    ]
    return [p for p in paths if p is not None]
