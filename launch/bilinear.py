"""Appendix F studies of parallel deflation: figures, summary.md and results.json.

    python launch/bilinear.py --config configs/studies/bilinear.py [--config.quick=True]
        [--config.experiments=convergence,noise --config.seed=0 --config.seeds=5
         --config.output_dir=runs/bilinear]
"""

from __future__ import annotations

import os

# Small linear algebra on 2 busy cores: multi-threaded BLAS/LAPACK oversubscribes
# and runs 10-50x slower (measured), so use one thread unless told otherwise.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to configs/studies/bilinear.py.", lock_config=True)


def _json_safe(value):
    """JSON cannot hold inf/NaN: write them as strings ("inf") in config and analysis."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def main(argv: list[str]) -> None:
    """Run the chosen studies and write figures, summary.md and results.json."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/studies/bilinear.py")
    from tqdm import tqdm

    from adapad_jax.bilinear import plots, studies

    try:
        specs = studies.build_experiments(config)
    except ValueError as error:
        sys.exit(f"error: {error}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(config.seed) + i for i in range(int(config.seeds))]
    started = time.perf_counter()
    experiments: dict[str, dict] = {}
    jobs = sum(len(spec.methods) for spec in specs)
    with tqdm(total=jobs, unit="run", dynamic_ncols=True) as bar:
        for spec in specs:
            bar.set_description(f"{spec.name} ({', '.join(spec.methods)}) x {len(seeds)} seeds")
            experiments[spec.name] = studies.run_experiment(spec, seeds)
            bar.update(len(spec.methods))
    analysis = studies.analyse(specs, experiments)
    figures = plots.plot_all(specs, experiments, analysis, out)
    summary = studies.summary_markdown(specs, experiments, analysis)
    elapsed = time.perf_counter() - started
    results = {
        "experiments": experiments,
        "analysis": analysis,
        "config": config.to_dict(),
        "seeds": seeds,
        "figures": [p.name for p in figures],
        "elapsed_seconds": elapsed,
    }
    (out / "results.json").write_text(json.dumps(_json_safe(results), allow_nan=False))
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and {len(figures)} figures in {elapsed:.1f} s")


if __name__ == "__main__":
    from adapad_jax.cli.common import help_exits_zero

    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))
