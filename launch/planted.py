"""Planted-rank benchmark: AdaPaD, joint, fixed-rank LoRA and AdaPaD ablations on teacher tasks, run to convergence.

    python launch/planted.py --config configs/studies/planted.py [--config.quick=True] [--config.seeds=3]
        [--config.tasks=branches --config.variants=adapad,lora --config.output_dir=runs/planted]
        [--config.results_doc=docs/RESULTS.md]

Writes output_dir/results.json (every run: error, ranks, curve, time per step; the summary rows), summary.md
(the table, with the command and date) and runs/<task>/<variant>/seed<k>/{ranks.json,planted.json}.
--config.results_doc merges the rows into that file's tables (a row replaces the same variant's, each row names
its run's command), so a run of some variants, e.g. --config.variants=adalora,increlora,sora,ardlora, adds them
to the all-methods table. Every (task, variant) is checked before the first run (a method not wired into the
trainer, or settings it refuses, stop it in one line).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to configs/studies/planted.py.", lock_config=True)
DOC_BEGIN, DOC_END = "<!-- planted-benchmark:begin -->", "<!-- planted-benchmark:end -->"


def _json_safe(value):
    """JSON cannot hold NaN: write it as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def apply_quick(config) -> None:
    """Shrink the study for a fast check: one task of 4 modules, 2 seeds, short growth interval and run."""
    config.seeds = 2
    config.tasks = config.tasks.split(",")[0]
    config.diagnostics = ""
    for settings in config.task_settings.values():
        settings.hidden, settings.num_layers, settings.planted = 8, 2, "3,0,0,2"
        settings.eval_rows = 256
    config.adapter.rank_budget, config.adapter.growth_interval = 8, 5
    config.optim.warmup_steps = 5
    config.stop.eval_every, config.stop.patience, config.stop.min_steps, config.stop.max_steps = 10, 2, 30, 60


def parse_tasks(config, names: list[str] | None = None) -> list:
    """The config's task names (or ``names``) -> PlantedTask objects; one clear error per bad entry."""
    from adapad_jax.studies.planted import PlantedTask

    tasks = []
    for name in names or list(filter(None, (n.strip() for n in config.tasks.split(",")))):
        if name not in config.task_settings:
            raise ValueError(f"tasks: unknown task {name!r}; defined: {sorted(config.task_settings)}")
        s = config.task_settings[name]
        try:
            planted = tuple(int(r) for r in s.planted.split(","))
        except ValueError:
            raise ValueError(f"task_settings.{name}.planted={s.planted!r} must be comma-separated ints") from None
        tasks.append(PlantedTask(name, planted, s.layout, s.hidden, s.num_layers, scale=s.scale,
                                 batch_size=s.batch_size, seq_len=s.seq_len, eval_rows=s.eval_rows))
    if not tasks:
        raise ValueError("tasks is empty")
    return tasks


def parse_diagnostics(config) -> list[tuple]:
    """``config.diagnostics`` ("task:variant,...") -> [(PlantedTask, variant)]; tasks from ``task_settings``."""
    from adapad_jax.studies.planted import ALL_VARIANTS

    pairs = []
    for item in filter(None, (n.strip() for n in config.diagnostics.split(","))):
        name, _, variant = item.partition(":")
        if variant not in ALL_VARIANTS:
            raise ValueError(f"diagnostics: {item!r} must be task:variant with a variant among {list(ALL_VARIANTS)}")
        pairs.append((parse_tasks(config, [name])[0], variant))
    return pairs


def preflight(config, pairs: list[tuple]) -> None:
    """Every (task, variant)'s config passes validation and its method can be built on the task's model (a method
    not wired into the trainer yet, or settings it refuses, stop here in one line, before any run)."""
    from adapad_jax.config.validation import check_fields
    from adapad_jax.methods.registry import build_method
    from adapad_jax.studies import planted as study
    from adapad_jax.testing.toy import make_toy_model
    from adapad_jax.training.settings import TrainerSettings

    adapter, optim = config.adapter.to_dict(), config.optim.to_dict()
    for task, variant in pairs:
        model = make_toy_model(hidden=task.hidden, num_layers=task.num_layers, vocab_size=task.vocab_size,
                               num_outputs=task.hidden, layout=task.layout, seed=0)
        run_config = study.study_config(adapter, optim, variant, 0, int(config.stop.max_steps), len(model.targets))
        run_config.output_dir = str(config.output_dir)  # the study's trainers write to a temp dir each
        check_fields(run_config)
        build_method(TrainerSettings.from_config(run_config), model.targets)


def write_results_doc(path: Path, summary: str) -> None:
    """Merge this run's rows into the planted-benchmark section of ``path`` (between the markers: a row replaces
    the one of the same variant and table, new ones are appended, each row names its run's command), or append
    the section."""
    from adapad_jax.studies.planted import merge_summaries

    text = path.read_text() if path.is_file() else "# Results\n"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        old, tail = rest.split(DOC_END, 1)
        text = head + f"{DOC_BEGIN}\n{merge_summaries(old, summary).rstrip()}\n{DOC_END}" + tail
    else:
        text = text.rstrip() + f"\n\n## Planted-rank benchmark\n\n{DOC_BEGIN}\n{summary.rstrip()}\n{DOC_END}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str]) -> None:
    """Run every (task, variant, seed), then write results.json, summary.md and the per-run ranks."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/studies/planted.py")
    from adapad_jax.studies import planted as study
    from adapad_jax.outputs.rank_outputs import write_ranks_json
    from adapad_jax.runtime.failures import ConfigError
    from adapad_jax.testing.toy import enable_compilation_cache

    with config.unlocked():
        if config.quick:
            apply_quick(config)
    variants = [v.strip() for v in config.variants.split(",") if v.strip()]
    try:
        tasks = parse_tasks(config)
        unknown = sorted(set(variants) - set(study.VARIANTS))
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; expected some of {list(study.VARIANTS)}")
        diagnostics = parse_diagnostics(config)
        stop = study.StopRule(**config.stop.to_dict())
        if int(config.seeds) < 1:
            raise ValueError(f"seeds={config.seeds} must be >= 1")
        for task in tasks + [t for t, _ in diagnostics]:
            if config.adapter.rank_budget % len(task.planted):
                raise ValueError(f"adapter.rank_budget={config.adapter.rank_budget} is not a multiple of task "
                                 f"{task.name}'s {len(task.planted)} modules, so no fixed-rank LoRA matches it")
        preflight(config, [(t, v) for t in tasks for v in variants] + diagnostics)
    except (ValueError, ConfigError) as error:
        sys.exit(f"error: {error}")
    enable_compilation_cache()
    adapter, optim = config.adapter.to_dict(), config.optim.to_dict()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(config.seed) + i for i in range(int(config.seeds))]
    started = time.perf_counter()
    records, diagnostic_records = [], []
    jobs = [(task, variant, records) for task in tasks for variant in variants]
    jobs += [(task, variant, diagnostic_records) for task, variant in diagnostics]
    for task, variant, sink in jobs:
        for seed in seeds:
            record = study.run_one(task, variant, seed, adapter, optim, stop, log=print)
            run_dir = out / "runs" / task.name / variant / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            write_ranks_json(run_dir / "ranks.json", record["ranks"])
            write_ranks_json(run_dir / "planted.json", record["planted"])
            sink.append(record)
    rows, diagnostic_rows = study.summarise(records), study.summarise(diagnostic_records)
    all_tasks = {t.name: t for t in tasks + [t for t, _ in diagnostics]}
    task_info = {
        t.name: {"planted": list(t.planted), "layout": t.layout, "budget": int(adapter["rank_budget"]),
                 "lora_rank": int(adapter["rank_budget"]) // len(t.planted), "r_max": int(adapter["r_max"]),
                 "best_planted_fraction": study.best_planted_fraction(t.planted, int(adapter["rank_budget"]),
                                                                      int(adapter["r_max"]))}
        for t in all_tasks.values()
    }
    elapsed = time.perf_counter() - started
    command = "python launch/planted.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = "\n".join([
        "Runs (the last column of each table names the run a row comes from):", "",
        f"- A: Command: `{command}` ({date}, {len(records) + len(diagnostic_records)} runs in {elapsed / 60:.1f} "
        f"min, seeds {seeds}).", "",
    ] + ([study.summary_markdown(rows, {t.name: task_info[t.name] for t in tasks})] if rows else []) + ([
        "### Diagnostics", "",
        study.summary_markdown(diagnostic_rows, {name: task_info[name] for name in
                                                 dict.fromkeys(r["task"] for r in diagnostic_rows)}, "####"),
    ] if diagnostic_rows else []))
    results = {"records": records, "rows": rows, "diagnostic_records": diagnostic_records,
               "diagnostic_rows": diagnostic_rows, "tasks": task_info, "config": config.to_dict(), "seeds": seeds,
               "variants": variants, "command": command, "date": date, "elapsed_seconds": elapsed}
    (out / "results.json").write_text(json.dumps(_json_safe(results), allow_nan=False, indent=1))
    (out / "summary.md").write_text(summary + "\n")
    if config.results_doc:
        try:
            write_results_doc(Path(config.results_doc), summary)
        except ValueError as error:
            sys.exit(f"error: {error} (results.json and summary.md are written)")
    print(summary)
    print(f"wrote {out / 'results.json'} and {out / 'summary.md'} in {elapsed:.1f} s")


if __name__ == "__main__":
    from adapad_jax.cli.common import help_exits_zero

    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))
