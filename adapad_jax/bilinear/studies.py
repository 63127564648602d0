"""The Appendix F studies: experiment specs from a config, runs over seeds, analyses and the summary table.

Over 400 lines because it holds one short function per study (seven of them) side by side, each the same shape:
run over seeds, reduce, tabulate; the engine they call is ``deflation.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.bilinear.deflation import DeflationSettings, activation_rounds, run_deflation_seeds
from adapad_jax.bilinear.diagnostics import diagnose
from adapad_jax.bilinear.problems import make_problem, spectrum

METHOD_NAMES = ("parallel_als", "sequential_als", "parallel_gd", "sequential_gd", "joint_gd")
STUDY_GROUPS = ("convergence", "self_correction", "noise", "rate_fit", "gap", "advance_learning")
CONVERGENCE_SPECTRA = ("exponential", "power_law", "uniform")
# The float32 floor: errors below this are round-off, not signal (used by the rate fit).
FIT_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """One named experiment: a problem family and the methods run on it."""

    name: str
    group: str
    spectrum_kind: str
    singular_values: tuple[float, ...]
    d_out: int
    d_in: int
    n: int
    noise: float
    methods: tuple[str, ...]
    settings: dict[str, DeflationSettings]
    parameter: float | None = None  # noise level or spectral gap delta, for the plots


def method_settings(method: str, study: Any, solver: Any) -> DeflationSettings:
    """DeflationSettings for a method name such as 'parallel_als' under a study's sizes."""
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHOD_NAMES)}")
    mode, subroutine = method.split("_")
    return DeflationSettings(
        method=mode,
        subroutine=subroutine,
        num_workers=study.rank,
        rounds=study.rounds,
        inner_iterations=study.inner_iterations,
        stagger=solver.stagger,
        rho=float(solver.rho),
        advance_learning=solver.advance_learning,
        ridge=solver.ridge,
        step_size=solver.gd_step_size,
        init_scale=solver.init_scale,
    )


def _parse_list(text: str, what: str, convert: Callable[[str], Any]) -> list:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ValueError(f"{what} is empty")
    try:
        return [convert(item) for item in items]
    except ValueError as error:
        raise ValueError(f"bad {what} {text!r}: {error}") from None


def effective_study(config: Any, group: str) -> Any:
    """The study's ConfigDict, shrunk when config.quick is set."""
    study = config[group]
    if not config.quick:
        return study
    shrunk = study.copy_and_resolve_references()
    with shrunk.unlocked():
        for field, value in config.quick_overrides[group].items():
            shrunk[field] = value
    return shrunk


def build_experiments(config: Any) -> list[ExperimentSpec]:
    """All experiments the config asks for, validated before any compute."""
    if int(config.seeds) < 1:
        raise ValueError(f"seeds must be >= 1, got {config.seeds}")
    solver = config.solver
    specs: list[ExperimentSpec] = []

    def add(name, group, study, kind, values, noise=0.0, parameter=None):
        methods = tuple(_parse_list(study.methods, f"{group}.methods", str))
        for field in ("d_out", "d_in", "n", "rank", "rounds", "inner_iterations"):
            if int(study[field]) < 1:
                raise ValueError(f"{group}.{field} must be >= 1, got {study[field]}")
        if study.rank > min(study.d_out, study.d_in) or study.n < study.d_in:
            raise ValueError(f"{group}: need rank <= min(d_out, d_in) and n >= d_in, got {dict(study)}")
        if noise < 0:
            raise ValueError(f"{group}: noise level must be >= 0, got {noise}")
        settings = {method: method_settings(method, study, solver) for method in methods}
        specs.append(
            ExperimentSpec(
                name=name, group=group, spectrum_kind=kind,
                singular_values=tuple(float(s) for s in values),
                d_out=study.d_out, d_in=study.d_in, n=study.n, noise=float(noise),
                methods=methods, settings=settings, parameter=parameter,
            )
        )

    study = effective_study(config, "convergence")
    for kind in CONVERGENCE_SPECTRA:
        values = spectrum(kind, study.rank, decay=study.decay, power=study.power)
        add(f"convergence_{kind}", "convergence", study, kind, values)
    study = effective_study(config, "self_correction")
    add("self_correction", "self_correction", study, "exponential", spectrum("exponential", study.rank, decay=study.decay))
    study = effective_study(config, "noise")
    for level in _parse_list(study.levels, "noise.levels", float):
        values = spectrum("exponential", study.rank, decay=study.decay)
        add(f"noise_{level:g}", "noise", study, "exponential", values, noise=level, parameter=level)
    study = effective_study(config, "rate_fit")
    add("rate_fit", "rate_fit", study, "exponential", spectrum("exponential", study.rank, decay=study.decay))
    study = effective_study(config, "gap")
    for delta in _parse_list(study.deltas, "gap.deltas", float):
        values = spectrum("linear", study.rank, gap=delta, floor=study.floor)
        add(f"gap_{delta:g}", "gap", study, "linear", values, parameter=delta)

    if "advance_learning" in config:
        study = effective_study(config, "advance_learning")
        add("advance_learning", "advance_learning", study, "exponential",
            spectrum("exponential", study.rank, decay=study.decay))
        specs[-1] = advance_learning_spec(specs[-1], int(study.stagger))

    requested = _parse_list(config.experiments, "experiments", str)
    known = {spec.name for spec in specs}
    if "all" in requested:
        return specs
    unknown = [name for name in requested if name not in known and name not in STUDY_GROUPS]
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {', '.join(unknown)}; expected 'all', a group "
            f"({', '.join(STUDY_GROUPS)}) or one of {', '.join(sorted(known))}"
        )
    return [spec for spec in specs if spec.name in requested or spec.group in requested]


def advance_label(method: str, on: bool) -> str:
    """The results key of a method run with advance learning on or off, e.g. 'parallel_als:advance_on'."""
    return f"{method}:advance_{'on' if on else 'off'}"


def advance_learning_spec(spec: ExperimentSpec, stagger: int) -> ExperimentSpec:
    """Every parallel method of ``spec`` twice, advance learning on and off, with workers ``stagger`` rounds apart.

    With stagger s a reserve worker gets s - 1 private rounds against its true deflation target before it
    activates; stagger 1 leaves none (advance learning then changes nothing), so s must be >= 2.
    """
    if stagger < 2:
        raise ValueError(f"advance_learning.stagger must be >= 2 (with stagger 1 no reserve trains), got {stagger}")
    workers = len(spec.singular_values)
    rounds = next(iter(spec.settings.values())).rounds
    if (workers - 1) * stagger >= rounds:
        raise ValueError(f"advance_learning: the last of {workers} workers activates at round {(workers - 1) * stagger}"
                         f" >= rounds={rounds}; raise rounds or lower stagger")
    settings = {}
    for method in spec.methods:
        if not method.startswith("parallel_"):
            raise ValueError(f"advance_learning.methods: advance learning is a parallel-deflation feature, got {method!r}")
        for on in (True, False):
            settings[advance_label(method, on)] = dataclasses.replace(
                spec.settings[method], stagger=stagger, advance_learning=on
            )
    return dataclasses.replace(spec, methods=tuple(settings), settings=settings)


def advance_learning_analysis(spec: ExperimentSpec, runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per run label: each worker's total error at its activation and at the end (median over seeds)."""
    out = {}
    for label, method_runs in runs.items():
        settings = spec.settings[label]
        workers = []
        for k, start in enumerate(activation_rounds(settings)):
            total = series_array(method_runs, "total", k)
            workers.append({
                "worker": k + 1,
                "activation_round": int(start),
                "total_at_activation": float(np.median(total[:, start])),
                "total_at_activation_per_seed": [float(x) for x in total[:, start]],
                "final_total": float(np.median(total[:, -1])),
            })
        errors = series_array(method_runs, "rel_weight_error")
        out[label] = {
            "advance_learning": settings.advance_learning,
            "stagger": settings.stagger,
            "workers": workers,
            "final_rel_weight_error_median": float(np.median(errors[:, -1])),
            "rounds_to_1e-3": rounds_to_reach(errors, 1e-3),
        }
    return out


def _json_list(values: np.ndarray) -> list:
    return [None if not math.isfinite(x) else float(x) for x in np.asarray(values, dtype=np.float64)]


def run_experiment(spec: ExperimentSpec, seeds: list[int], dtype=jnp.float32) -> dict[str, list[dict]]:
    """Run every method of `spec` on the same problems and starting points (one per seed)."""
    sigma = jnp.asarray(spec.singular_values, dtype)
    keys = jnp.stack([jax.random.key(seed) for seed in seeds])
    problem_keys, init_keys = jax.vmap(lambda key: tuple(jax.random.split(key)))(keys)
    problems = _make_problems(problem_keys, sigma, jnp.asarray(spec.noise, dtype), spec.d_out, spec.d_in, spec.n)
    results: dict[str, list[dict]] = {}
    for method in spec.methods:
        trace = run_deflation_seeds(problems, init_keys, spec.settings[method])
        diag = jax.device_get(_diagnose_seeds(problems, trace))
        results[method] = [
            {
                "seed": int(seed),
                "rel_weight_error": _json_list(diag.rel_weight_error[i]),
                "workers": [
                    {
                        "mismatch": _json_list(diag.mismatch[i, :, k]),
                        "numerical": _json_list(diag.numerical[i, :, k]),
                        "total": _json_list(diag.total[i, :, k]),
                    }
                    for k in range(diag.mismatch.shape[2])
                ],
            }
            for i, seed in enumerate(seeds)
        ]
    return results


@jax.jit
def _diagnose_seeds(problems, trace):
    return jax.vmap(diagnose)(problems, trace)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _make_problems(keys, sigma, noise, d_out, d_in, n):
    return jax.vmap(lambda key: make_problem(key, sigma, d_out=d_out, d_in=d_in, n=n, noise=noise))(keys)


# ----------------------------------------------------------------------------- analyses


def series_array(runs: list[dict], field: str, worker: int | None = None) -> np.ndarray:
    """[seeds, rounds] float array with NaN for null."""
    rows = [run[field] if worker is None else run["workers"][worker][field] for run in runs]
    return np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float64)


def mismatch_drops(runs: list[dict], activations: np.ndarray) -> list[dict]:
    """Per worker: mismatch at activation, at the last round, and their ratio (median over seeds)."""
    out = []
    for k, start in enumerate(activations):
        mismatch = series_array(runs, "mismatch", k)
        first, last = mismatch[:, start], mismatch[:, -1]
        out.append(
            {
                "worker": k + 1,
                "activation_round": int(start),
                "at_activation": float(np.median(first)),
                "final": float(np.median(last)),
                "drop_factor": float(np.median(first / last)),
                "max_relative_change_after_activation": float(
                    np.max(np.abs(mismatch[:, start:] - first[:, None]) / first[:, None])
                ),
            }
        )
    return out


def final_ratio(numerator: list[dict], denominator: list[dict]) -> np.ndarray:
    """Per-seed ratio of final relative weight errors."""
    return series_array(numerator, "rel_weight_error")[:, -1] / series_array(denominator, "rel_weight_error")[:, -1]


def empirical_warmup(total: np.ndarray, start: int, window: int = 5) -> int | None:
    """First round >= start after which the total error decreases monotonically for `window` rounds."""
    for t in range(start, len(total) - window):
        segment = total[t : t + window + 1]
        if np.all(np.diff(segment) < 0):
            return t
    return None


def fit_rate(total: np.ndarray, start: int) -> float | None:
    """Per-round contraction: least-squares slope of log total error on rounds where it is below
    half its activation value and above the float32 floor."""
    rounds = np.arange(len(total))
    keep = (rounds >= start) & (total < 0.5 * total[start]) & (total > FIT_FLOOR)
    if keep.sum() < 3:
        return None
    slope = np.polyfit(rounds[keep], np.log(total[keep]), 1)[0]
    return float(np.exp(slope))


def predicted_rates(singular_values: np.ndarray, inner_iterations: int) -> np.ndarray:
    """Per-round rate of worker k: max over j <= k of the ALS contraction (sigma_{j+1}/sigma_j)^(2 T_inner),
    from the nominal singular values of W* (sigma_{K+1} = 0).

    A stand-in for the paper's recurrence (8), whose formula was lost in the text we have.
    """
    padded = np.append(singular_values, 0.0)
    own = (padded[1:] / padded[:-1]) ** (2 * inner_iterations)
    return np.maximum.accumulate(own)


def rate_analysis(runs: list[dict], activations: np.ndarray, spec: ExperimentSpec, inner_iterations: int) -> list[dict]:
    """Warm-up and fitted geometric rate per worker, with the staggered-activation prediction."""
    predicted = predicted_rates(np.array(spec.singular_values), inner_iterations)
    out = []
    for k, start in enumerate(activations):
        total = series_array(runs, "total", k)
        warmups = [empirical_warmup(row, start) for row in total]
        rates = [fit_rate(row, start) for row in total]
        good_w = [w for w in warmups if w is not None]
        good_r = [r for r in rates if r is not None]
        out.append(
            {
                "worker": k + 1,
                "activation_round": int(start),
                "warmup_per_seed": warmups,
                "warmup_median": float(np.median(good_w)) if good_w else None,
                "rate_per_seed": rates,
                "rate_median": float(np.median(good_r)) if good_r else None,
                "predicted_rate": float(predicted[k]),
            }
        )
    return out


def rounds_to_reach(errors: np.ndarray, threshold: float) -> float | None:
    """Median over seeds of the first round with relative weight error below threshold."""
    firsts = []
    for row in errors:
        hit = np.nonzero(row < threshold)[0]
        firsts.append(hit[0] if len(hit) else np.nan)
    value = np.nanmedian(firsts) if np.any(np.isfinite(firsts)) else None
    return None if value is None else float(value)


def analyse(specs: list[ExperimentSpec], experiments: dict[str, dict]) -> dict[str, Any]:
    """Self-correction drops, noise ratios, rate fits and gap figures from the raw results."""
    analysis: dict[str, Any] = {}
    for spec in specs:
        runs = experiments[spec.name]
        if spec.group == "self_correction":
            entry = {}
            for method in ("parallel_als", "sequential_als", "parallel_gd", "sequential_gd"):
                if method in runs:
                    entry[method] = mismatch_drops(runs[method], activation_rounds(spec.settings[method]))
            analysis["self_correction"] = entry
        if spec.group == "noise" and {"parallel_als", "sequential_als"} <= set(runs):
            ratios = final_ratio(runs["parallel_als"], runs["sequential_als"])
            analysis.setdefault("noise", {})[spec.name] = {
                "noise": spec.noise,
                "parallel_final_median": float(np.median(series_array(runs["parallel_als"], "rel_weight_error")[:, -1])),
                "sequential_final_median": float(np.median(series_array(runs["sequential_als"], "rel_weight_error")[:, -1])),
                "ratio_per_seed": [float(r) for r in ratios],
                "reference_floor": spec.noise * math.sqrt(len(spec.singular_values) * (spec.d_out + spec.d_in) / spec.n)
                / float(np.linalg.norm(spec.singular_values)),
            }
        if spec.group == "rate_fit" and "parallel_als" in runs:
            settings = spec.settings["parallel_als"]
            analysis["rate_fit"] = rate_analysis(
                runs["parallel_als"], activation_rounds(settings), spec, settings.inner_iterations
            )
        if spec.group == "advance_learning":
            analysis["advance_learning"] = advance_learning_analysis(spec, runs)
        if spec.group == "gap":
            for method, method_runs in runs.items():
                errors = series_array(method_runs, "rel_weight_error")
                analysis.setdefault("gap", {}).setdefault(method, {})[spec.name] = {
                    "delta": spec.parameter,
                    "final_median": float(np.median(errors[:, -1])),
                    "rounds_to_1e-4": rounds_to_reach(errors, 1e-4),
                }
    return analysis


def _fmt(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2e}"


def summary_markdown(specs: list[ExperimentSpec], experiments: dict[str, dict], analysis: dict[str, Any]) -> str:
    """The markdown summary table(s) printed at the end of a run."""
    lines = ["## Final relative weight error (median [min, max] over seeds)", "",
             "| experiment | method | final rel. weight error | min | max |", "|---|---|---|---|---|"]
    for spec in specs:
        for method, runs in experiments[spec.name].items():
            final = series_array(runs, "rel_weight_error")[:, -1]
            lines.append(f"| {spec.name} | {method} | {_fmt(np.median(final))} | {_fmt(final.min())} | {_fmt(final.max())} |")
    if "self_correction" in analysis:
        lines += ["", "## Self-correction: deflation mismatch / ||W* X|| (median over seeds)", "",
                  "| method | worker | activation round | at activation | final | drop factor |", "|---|---|---|---|---|---|"]
        for method, rows in analysis["self_correction"].items():
            for row in rows:
                lines.append(
                    f"| {method} | {row['worker']} | {row['activation_round']} | {_fmt(row['at_activation'])} "
                    f"| {_fmt(row['final'])} | {row['drop_factor']:.3g} |"
                )
    if "noise" in analysis:
        lines += ["", "## Noise floors (ALS): final relative weight error", "",
                  "| experiment | parallel | sequential | ratio median | ratio min | ratio max | reference scale |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in analysis["noise"].items():
            r = np.array(row["ratio_per_seed"])
            lines.append(
                f"| {name} | {_fmt(row['parallel_final_median'])} | {_fmt(row['sequential_final_median'])} "
                f"| {np.median(r):.3f} | {r.min():.3f} | {r.max():.3f} | {_fmt(row['reference_floor'])} |"
            )
    if "rate_fit" in analysis:
        lines += ["", "## Per-worker geometric rate (parallel ALS)", "",
                  "| worker | activation s_k | empirical warm-up (median) | fitted rate (median) | predicted rate |",
                  "|---|---|---|---|---|"]
        for row in analysis["rate_fit"]:
            warm = "—" if row["warmup_median"] is None else f"{row['warmup_median']:.1f}"
            rate = "—" if row["rate_median"] is None else f"{row['rate_median']:.3f}"
            lines.append(f"| {row['worker']} | {row['activation_round']} | {warm} | {rate} | {row['predicted_rate']:.3f} |")
    if "gap" in analysis:
        lines += ["", "## Spectral-gap sweep (linear spectrum)", "",
                  "| method | delta | final rel. weight error (median) | rounds to 1e-4 (median) |", "|---|---|---|---|"]
        for method, rows in analysis["gap"].items():
            for row in rows.values():
                reach = "never" if row["rounds_to_1e-4"] is None else f"{row['rounds_to_1e-4']:.0f}"
                lines.append(f"| {method} | {row['delta']:g} | {_fmt(row['final_median'])} | {reach} |")
    if "advance_learning" in analysis:
        lines += ["", "## Advance learning (parallel deflation, staggered activation): worker total error "
                  "(median over seeds)", "",
                  "| run | stagger | worker | activation round | at activation | final | final rel. weight error "
                  "| rounds to 1e-3 |", "|---|---|---|---|---|---|---|---|"]
        for label, row in analysis["advance_learning"].items():
            reach = "never" if row["rounds_to_1e-3"] is None else f"{row['rounds_to_1e-3']:.0f}"
            for worker in row["workers"]:
                lines.append(
                    f"| {label} | {row['stagger']} | {worker['worker']} | {worker['activation_round']} "
                    f"| {_fmt(worker['total_at_activation'])} | {_fmt(worker['final_total'])} "
                    f"| {_fmt(row['final_rel_weight_error_median'])} | {reach} |"
                )
    return "\n".join(lines) + "\n"
