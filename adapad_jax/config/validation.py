"""The rules of a run config that need nothing but the config: the one place each of them lives.

``check_fields`` checks every field's type, range and choice, and the fields against each other, without touching
files, devices or the model. The trainer, the allocator, the step, the mesh builder and the run call the shared
rules here (``check_components_divide``, ``check_rank_budget``, ``check_initial_rank``, ``check_method``,
``check_lora_rank``, ``has_slot_axis``, ``batch_splits``, ``check_profile_window``, the output_dir / process /
loaded-data checks) rather than restating them. The checks against the model checkpoint and a saved run
(``validate_config``, ``check_resume``) are ``adapad_jax.run.checks``; docs/ARCHITECTURE.md lists the owner of
each rule. Every problem is one ``ConfigError`` whose message names the field and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import ml_collections

from adapad_jax.config.schema import (
    CUSTOM_METRICS,
    DATA_SOURCES,
    DTYPES,
    HEAD_GRADIENTS,
    IMPORTANCES,
    METHODS,
    METHOD_BLOCKS,
    PROBLEM_TYPES,
    SCHEDULES,
    TASK_NAMES,
    ConfigError,
)

# The fields a resume may change (docs/TROUBLESHOOTING.md). None of them alters the training trajectory except
# the run's length (RESUME_LENGTH_FIELDS, only with train.extend_schedule=True: the schedule is re-planned) and
# adapter.rank_budget (checked against the resumed state). Every other field, including any added later, must keep
# the run's value. The changes are recorded in the run's resumes.jsonl, never merged into its config.json.
RESUME_CHANGEABLE_FIELDS = (
    "output_dir",
    "compilation_cache_dir",
    "train.num_steps",
    "train.num_epochs",
    "train.extend_schedule",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.eval_batch_size",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "logging.tensorboard",
    "logging.wandb",
    "logging.wandb_project",
    "logging.wandb_entity",
    "logging.wandb_name",
    "logging.wandb_tags",
    "logging.wandb_group",
    "train.profile_start_step",
    "train.profile_num_steps",
    "train.grad_accum_steps",
    "data.cache_features",
    "data.cache_dir",
    "mesh.data",
    "mesh.components",
    "adapter.slot_chunk_size",
    "adapter.remat",
    "adapter.rank_budget",
    "adapter.param_budget",
)
RESUME_LENGTH_FIELDS = ("train.num_steps", "train.num_epochs")
# Local paths, stored absolute (``absolute_local_paths``) and compared as paths; hub ids stay ids.
LOCAL_PATH_FIELDS = ("model.name_or_path", "data.train_file", "data.validation_file")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _require_type(config: ml_collections.ConfigDict, dotted: str, kinds: tuple[type, ...]) -> Any:
    value = _get(config, dotted)
    # bool is an int in Python; an int field given True/False is still a mistake.
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{dotted} must be {' or '.join(k.__name__ for k in kinds)}, got the bool {value}")
    if not isinstance(value, kinds):
        raise ConfigError(
            f"{dotted} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r}"
        )
    return value


def _require_choice(config: ml_collections.ConfigDict, dotted: str, choices: Sequence[str]) -> str:
    value = _require_type(config, dotted, (str,))
    if value not in choices:
        raise ConfigError(f"{dotted}='{value}' is not one of: {', '.join(choices)}")
    return value


def _require_range(config, dotted: str, kinds: tuple[type, ...], low=None, high=None, high_open=False) -> Any:
    value = _require_type(config, dotted, kinds)
    if low is not None and value < low:
        raise ConfigError(f"{dotted}={value} must be >= {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{dotted}={value} must be {'<' if high_open else '<='} {high}")
    return value


def has_slot_axis(method: str) -> bool:
    """adapad and joint keep ``adapter.r_max`` slots grown by the allocator; lora trains a fixed rank: no slot axis."""
    return method != "lora"


def check_method(method: str) -> None:
    """``adapter.method`` must be one of ``METHODS``."""
    if method not in METHODS:
        raise ConfigError(f"adapter.method='{method}' is not one of: {', '.join(METHODS)}")


# adapter.<method>.* fields: (kinds, low, high, high_open) as _require_range takes them; a str field lists choices.
_REAL, _INT = (int, float), (int,)
METHOD_FIELD_RULES: dict[str, tuple] = {
    "adalora.tinit": (_INT, 0, None, False), "adalora.tfinal": (_INT, 0, None, False),
    "adalora.deltaT": (_INT, 1, None, False), "adalora.beta1": (_REAL, 0.0, 1.0, True),
    "adalora.beta2": (_REAL, 0.0, 1.0, True), "adalora.orth_reg_weight": (_REAL, 0.0, None, False),
    "increlora.beta1": (_REAL, 0.0, 1.0, True), "increlora.beta2": (_REAL, 0.0, 1.0, True),
    "increlora.reg_orth_coef": (_REAL, 0.0, None, False), "increlora.incre_rank_num": (_INT, 0, None, False),
    "increlora.init_warmup": (_INT, 0, None, False), "increlora.advance_learn": ((bool,),),
    "increlora.multi_lr": ((bool,),),
    "sora.sparse_lambda": (_REAL, 0.0, None, False), "sora.sparse_lambda_2": (_REAL, 0.0, None, False),
    "sora.sparse_lr": (_REAL, 0.0, None, False), "sora.lambda_schedule": ("", "linear", "log_linear", "exp_linear"),
    "sora.max_lambda": (_REAL, 0.0, None, False), "sora.lambda_num": (_INT, 1, None, False),
    "sora.stage_steps": (_INT, 0, None, False),
    "ardlora.lam": (_REAL, 0.0, None, False), "ardlora.beta": (_REAL, 0.0, None, False),
    "ardlora.tau": (_REAL, 0.0, None, False), "ardlora.alpha_lr": (_REAL, 0.0, None, False),
}


def check_method_blocks(config: ml_collections.ConfigDict) -> None:
    """Every ``adapter.<method>.*`` field's type and range (``METHOD_FIELD_RULES``), whichever method runs."""
    for field, rule in METHOD_FIELD_RULES.items():
        dotted = f"adapter.{field}"
        if isinstance(rule[0], str):
            _require_choice(config, dotted, rule)
        elif len(rule) == 1:
            _require_type(config, dotted, rule[0])
        else:
            kinds, low, high, high_open = rule
            _require_range(config, dotted, tuple(k for k in kinds), low, high, high_open=high_open)
    for method in METHOD_BLOCKS:
        extra = sorted(set(config.adapter[method].keys()) - {f.split(".", 1)[1] for f in METHOD_FIELD_RULES
                                                              if f.startswith(method + ".")})
        if extra:
            raise ConfigError(f"adapter.{method}.{extra[0]} is not a field of adapter.{method}")


def check_method_overrides(method: str, overridden: Sequence[str]) -> None:
    """A field set on the command line for a method that does not read it (``adapter.<other method>.*``) is
    refused: it would be silently ignored."""
    for dotted in overridden:
        parts = dotted.split(".")
        if len(parts) >= 3 and parts[0] == "adapter" and parts[1] in METHOD_BLOCKS and parts[1] != method:
            raise ConfigError(f"{dotted} is read only by adapter.method={parts[1]}, and this run's method is "
                              f"{method}; drop it or set --config.adapter.method={parts[1]}")


def check_lora_rank(lora_rank: int) -> None:
    """lora's fixed rank (``adapter.lora_rank``) is at least 1."""
    if lora_rank < 1:
        raise ConfigError(f"adapter.lora_rank={lora_rank} must be >= 1")


def check_initial_rank(initial_rank: int, r_max: int | None) -> None:
    """Every module starts with 1 to ``r_max`` committed slots (``r_max`` None: lora, no slot axis to bound it)."""
    if initial_rank < 1:
        raise ConfigError(f"adapter.initial_rank={initial_rank} must be >= 1")
    if r_max is not None and initial_rank > r_max:
        raise ConfigError(f"adapter.initial_rank={initial_rank} is larger than adapter.r_max={r_max}")


def batch_splits(rows: int, data: int, accum: int = 1) -> bool:
    """``rows`` split evenly over ``mesh.data`` devices and, on each, into ``accum`` equal micro-batches."""
    return rows % (accum * data) == 0


def check_components_divide(r_max: int, components: int) -> None:
    """The slot axis (``adapter.r_max`` slots) is split over the ``components`` mesh axis: it must divide evenly."""
    if r_max % components:
        divisors = [c for c in range(1, r_max + 1) if r_max % c == 0]
        raise ConfigError(
            f"mesh.components={components} does not divide adapter.r_max={r_max}: the slot axis is split over "
            f"the components axis; use one of {divisors}"
        )


def check_rank_budget(rank_budget: int, num_modules: int, initial_rank: int, model_name: str = "") -> None:
    """Every adapted module starts at ``initial_rank``, so a growing run's budget must cover that much."""
    if rank_budget < num_modules * initial_rank:
        where = f" of '{model_name}'" if model_name else ""
        raise ConfigError(
            f"adapter.rank_budget={rank_budget} is below the {num_modules} adapted modules x "
            f"adapter.initial_rank={initial_rank} = {num_modules * initial_rank}{where}: every module starts "
            f"with rank {initial_rank}"
        )


def check_profile_window(start: int, count: int, num_steps: int) -> None:
    """A profiler window that starts after the run's last step would trace nothing: one line naming it."""
    if start > num_steps:
        raise ConfigError(f"train.profile_start_step={start} is after the run's last step ({num_steps}): nothing "
                          f"would be traced; choose a step in 1..{num_steps} (0 = no profile)")


def budget_field(method: str) -> str:
    """The field ``adapter.param_budget`` replaces: lora's rank in every module, else the total rank budget."""
    return "rank_budget" if has_slot_axis(method) else "lora_rank"


def budget_from_params(param_budget: int, widths: Sequence[int], method: str, initial_rank: int = 1) -> int:
    """``adapter.param_budget`` (adapter factor parameters, head excluded) -> the value of ``budget_field(method)``.

    ``widths``: in + out of each adapted module. rank_budget: the largest total rank B whose uniform spread fits,
    B x mean(in + out) <= param_budget, i.e. ``floor(param_budget x M / sum(in + out))`` (exact when B is a
    multiple of M: DeBERTaV3-base's 72 modules, mean 2,304, take 331,776 for B = 144). lora_rank: the largest r
    with r x sum(in + out) <= param_budget. A budget below every module's first rank is refused in one line.
    """
    modules, total = len(widths), int(sum(int(w) for w in widths))
    if has_slot_axis(method):
        value, floor_rank = param_budget * modules // total, modules * initial_rank
        needed = -(-floor_rank * total // modules)
        what = f"{modules} adapted modules x adapter.initial_rank={initial_rank}"
    else:
        value, floor_rank, needed = param_budget // total, 1, total
        what = f"rank 1 in each of the {modules} adapted modules"
    if value < floor_rank:
        raise ConfigError(
            f"adapter.param_budget={param_budget} is below {what} (sum of in + out {total}): give at least {needed}"
        )
    return int(value)


# Largest accepted optim.learning_rate: AdamW steps of this size already destroy any trained weights.
MAX_LEARNING_RATE = 1.0


def check_finite_numbers(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every float field must be finite (NaN and inf pass ordinary range checks)."""
    import math

    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            check_finite_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key}={value} is not a finite number")


def check_fields(config: ml_collections.ConfigDict, *, installed_packages: bool = True) -> None:
    """Check every field's type and range (no file or device access); ``installed_packages``: also logging's."""
    integer, real = (int,), (int, float)
    check_finite_numbers(config)
    _require_choice(config, "task", TASK_NAMES)
    _require_type(config, "seed", integer)
    _require_type(config, "compilation_cache_dir", (str,))
    if not _require_type(config, "output_dir", (str,)).strip():
        raise ConfigError("output_dir is empty: give --config.output_dir=<directory for this run's outputs>")
    if not _require_type(config, "model.name_or_path", (str,)).strip():
        raise ConfigError("model.name_or_path is empty: give a hub id or a local checkpoint directory")
    _require_choice(config, "model.dtype", DTYPES)
    _require_type(config, "model.revision", (str,))
    _require_range(config, "model.classifier_dropout", real, 0.0, 1.0, high_open=True)

    if config.data.get("source") == "tfds":
        from adapad_jax.data.loading import TFDS_REMOVED

        raise ConfigError(TFDS_REMOVED)
    _require_choice(config, "data.source", DATA_SOURCES)
    _require_type(config, "data.train_file", (str,))
    _require_type(config, "data.validation_file", (str,))
    max_length = _require_range(config, "data.max_length", integer, 8)
    stride = _require_range(config, "data.doc_stride", integer, 1)
    if config.task.startswith("squad") and stride >= max_length:
        raise ConfigError(f"data.doc_stride={stride} must be smaller than data.max_length={max_length}")
    _require_range(config, "data.max_train_examples", integer, 0)
    _require_range(config, "data.max_eval_examples", integer, 0)
    _require_type(config, "data.cache_features", (bool,))
    _require_type(config, "data.cache_dir", (str,))
    check_custom_fields(config)

    method = _require_type(config, "adapter.method", (str,))
    check_method(method)
    targets = _get(config, "adapter.target_modules")
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not all(
        isinstance(t, str) and t for t in targets
    ):
        raise ConfigError(f"adapter.target_modules must be a tuple of module names, got {targets!r}")
    r_max = _require_range(config, "adapter.r_max", integer, 1)
    _require_range(config, "adapter.rank_budget", integer, 1)
    _require_range(config, "adapter.param_budget", integer, 0)
    check_lora_rank(_require_type(config, "adapter.lora_rank", integer))
    _require_range(config, "adapter.alpha", real, 0.0)
    _require_range(config, "adapter.init_std", real, 0.0)
    check_initial_rank(_require_type(config, "adapter.initial_rank", integer), r_max if has_slot_axis(method) else None)
    _require_range(config, "adapter.top_k", integer, 1)
    _require_range(config, "adapter.growth_interval", integer, 1)
    _require_range(config, "adapter.sync_every", integer, 0)
    _require_range(config, "adapter.ema_beta1", real, 0.0, 1.0, high_open=True)
    _require_range(config, "adapter.ema_beta2", real, 0.0, 1.0, high_open=True)
    _require_choice(config, "adapter.importance", IMPORTANCES)
    _require_choice(config, "adapter.head_gradient", HEAD_GRADIENTS)
    _require_type(config, "adapter.advance_learning", (bool,))
    _require_type(config, "adapter.grow", (bool,))
    _require_range(config, "adapter.orth_reg", real, 0.0)
    _require_range(config, "adapter.dropout", real, 0.0, 1.0, high_open=True)
    _require_range(config, "adapter.slot_chunk_size", integer, 0)
    _require_type(config, "adapter.remat", (bool,))
    check_method_blocks(config)

    _require_range(config, "optim.learning_rate", real, 0.0)
    if config.optim.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate={config.optim.learning_rate} must be > 0")
    if config.optim.learning_rate > MAX_LEARNING_RATE:
        raise ConfigError(f"optim.learning_rate={config.optim.learning_rate} is absurdly large "
                          f"(> {MAX_LEARNING_RATE}); AdamW learning rates for adapters are around 1e-4 to 1e-2")
    _require_range(config, "optim.weight_decay", real, 0.0)
    _require_range(config, "optim.adapter_weight_decay", real, 0.0)
    _require_range(config, "optim.warmup_steps", integer, 0)
    _require_choice(config, "optim.schedule", SCHEDULES)
    _require_range(config, "optim.grad_clip", real, 0.0)
    _require_range(config, "optim.b1", real, 0.0, 1.0, high_open=True)
    _require_range(config, "optim.b2", real, 0.0, 1.0, high_open=True)
    _require_range(config, "optim.eps", real, 0.0)

    _require_range(config, "train.num_epochs", integer, 1)
    _require_range(config, "train.num_steps", integer, -1)
    _require_type(config, "train.extend_schedule", (bool,))
    batch = _require_range(config, "train.batch_size", integer, 1)
    eval_batch = _require_range(config, "train.eval_batch_size", integer, 1)
    accum = _require_range(config, "train.grad_accum_steps", integer, 1)
    _require_range(config, "train.eval_every_steps", integer, 0)
    _require_range(config, "train.log_every_steps", integer, 1)
    if _require_type(config, "train.select_best", (bool,)) and config.train.eval_every_steps == 0:
        raise ConfigError("train.select_best=True needs train.eval_every_steps > 0: it keeps the best of the "
                          "evaluated checkpoints (or set train.select_best=False)")
    profile_start = _require_range(config, "train.profile_start_step", integer, 0)
    _require_range(config, "train.profile_num_steps", integer, 1)
    if profile_start and config.train.num_steps >= 0:
        check_profile_window(profile_start, config.train.profile_num_steps, config.train.num_steps)
    _require_type(config, "logging.tensorboard", (bool,))
    _require_type(config, "logging.wandb", (bool,))
    for name in ("project", "entity", "name", "tags", "group"):
        _require_type(config, f"logging.wandb_{name}", (str,))
    if installed_packages:
        check_logging_packages(config)

    _require_range(config, "checkpoint.every_steps", integer, 0)
    _require_range(config, "checkpoint.keep", integer, 1)

    data = _require_range(config, "mesh.data", integer, 1)
    components = _require_range(config, "mesh.components", integer, 1)
    if has_slot_axis(method):
        check_components_divide(r_max, components)
    if not batch_splits(batch, data):
        raise ConfigError(f"train.batch_size={batch} is not divisible by mesh.data={data}")
    if not batch_splits(batch, data, accum):
        raise ConfigError(f"train.batch_size={batch} is not divisible by train.grad_accum_steps={accum} x "
                          f"mesh.data={data} = {accum * data}: every data device splits its rows into "
                          f"grad_accum_steps equal micro-batches")
    if not batch_splits(eval_batch, data):
        raise ConfigError(f"train.eval_batch_size={eval_batch} is not divisible by mesh.data={data}")


def _names(config: ml_collections.ConfigDict, dotted: str) -> tuple[str, ...]:
    """A tuple-of-names field: a tuple or list of distinct non-empty strings."""
    value = _get(config, dotted)
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v.strip()
                                                                                 for v in value):
        raise ConfigError(f"{dotted} must be a tuple of names, e.g. ('a', 'b'), got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{dotted}={tuple(value)!r} names an entry twice")
    return tuple(value)


def check_custom_fields(config: ml_collections.ConfigDict) -> None:
    """The data.* fields of task=custom (text and label columns, labels, problem type, metric, hub dataset)."""
    columns = _names(config, "data.text_columns")
    label_names = _names(config, "data.label_names")
    problem = _require_choice(config, "data.problem_type", PROBLEM_TYPES)
    metric = _require_choice(config, "data.metric", CUSTOM_METRICS)
    label_column = _require_type(config, "data.label_column", (str,))
    _require_type(config, "data.dataset_name", (str,))
    _require_type(config, "data.dataset_config", (str,))
    if config.task != "custom":
        if columns or label_names or config.data.dataset_name:
            raise ConfigError(f"data.text_columns, data.label_names and data.dataset_name are for task=custom; "
                              f"task {config.task} has its own columns, labels and dataset")
        return
    if len(columns) not in (1, 2):
        raise ConfigError(f"task=custom needs data.text_columns: one column name or two (a sentence pair), got "
                          f"{columns!r}; e.g. --config.data.text_columns='(\"review\",)'")
    if not label_column.strip() or label_column in columns:
        raise ConfigError(f"data.label_column={label_column!r} must name a column other than the text columns")
    if not (config.data.train_file or config.data.validation_file or config.data.dataset_name):
        raise ConfigError("task=custom needs data: data.train_file and data.validation_file (jsonl, json, csv, tsv "
                          "or parquet), or a hub dataset in data.dataset_name")
    if config.data.dataset_name and (config.data.train_file or config.data.validation_file):
        raise ConfigError("give either data.dataset_name or data.train_file / data.validation_file, not both")
    if problem == "regression" and label_names:
        raise ConfigError("data.label_names is for classification: data.problem_type=regression has one output")
    if len(label_names) == 1:
        raise ConfigError(f"data.label_names={label_names!r} names one class: classification needs at least two")
    regression_metric = metric == "pearson"
    if metric != "auto" and problem != "auto" and regression_metric != (problem == "regression"):
        raise ConfigError(f"data.metric={metric} does not fit data.problem_type={problem}: pearson is for "
                          "regression, accuracy / f1 / matthews_correlation for classification")
    if metric == "f1" and label_names and len(label_names) != 2:
        raise ConfigError(f"data.metric=f1 is the F1 of class 1 of two classes; data.label_names has "
                          f"{len(label_names)}: use accuracy or matthews_correlation")


def check_logging_packages(config: ml_collections.ConfigDict) -> None:
    """``logging.*`` can be honoured: the packages it needs are installed (looked up, not imported)."""
    import importlib.util

    if config.logging.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("logging.tensorboard=True needs the tensorboardX package: pip install tensorboardX "
                          "(or set --config.logging.tensorboard=False)")
    if (config.logging.wandb or config.logging.wandb_project) and importlib.util.find_spec("wandb") is None:
        project = config.logging.wandb_project
        asked = "logging.wandb=True" if config.logging.wandb else f"logging.wandb_project='{project}'"
        raise ConfigError(f"{asked} needs the wandb package: pip install 'adapad_jax[wandb]' (or turn W&B off: "
                          "--config.logging.wandb=False --config.logging.wandb_project='')")


def check_output_dir_path(output_dir: Path, name: str = "output_dir") -> None:
    """``output_dir`` (the option ``name``) must be creatable: no part of its path may be a regular file."""
    blocking = next((parent for parent in output_dir.absolute().parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"{name} '{output_dir}' cannot be created: '{blocking}' is a file, not a directory")


def check_output_dir_is_directory(output_dir: Path) -> None:
    """An existing ``output_dir`` must be a directory."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir '{output_dir}' exists and is not a directory")


def check_processes_use_all_devices(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    """With several processes (``jax.distributed``) the mesh spans every device."""
    mesh_size = int(config.mesh.data) * int(config.mesh.components)
    if process_count > 1 and mesh_size != num_devices:
        raise ConfigError(
            f"with {process_count} processes the mesh must use all {num_devices} devices: "
            f"mesh.data={config.mesh.data} x mesh.components={config.mesh.components} = {mesh_size}"
        )


def check_loaded_data(data: Any, want_train: bool) -> None:
    """The loaded ``TaskData`` has training rows when the run trains, and validation rows always."""
    if want_train and data.train is None:
        raise ConfigError(
            "training needs data: give data.train_file (or use the hub source), or set train.num_steps=0"
        )
    if not data.evals:
        raise ConfigError("no validation data: give data.validation_file (or use the hub source)")


def check_mesh(config: ml_collections.ConfigDict, num_devices: int, platform: str = "") -> None:
    """The mesh must fit the devices this process sees."""
    need = config.mesh.data * config.mesh.components
    if need > num_devices:
        raise ConfigError(
            f"mesh.data={config.mesh.data} x mesh.components={config.mesh.components} needs {need} devices but only "
            f"{num_devices} {platform + ' ' if platform else ''}device(s) are available"
        )


def absolute_local_paths(config: ml_collections.ConfigDict) -> None:
    """Make local model / data paths absolute (hub ids stay ids), so that the run's records hold from any directory."""
    import os

    def absolute(value: str) -> str:
        parts = [part.strip() for part in value.split(",")]
        return ",".join(
            os.path.abspath(os.path.expanduser(p)) if p and os.path.exists(os.path.expanduser(p)) else p for p in parts
        )

    model = os.path.expanduser(config.model.name_or_path)
    if model and os.path.exists(model):
        config.model.name_or_path = os.path.abspath(model)
    for field in ("train_file", "validation_file"):
        if config.data[field]:
            config.data[field] = absolute(config.data[field])


def task_spec_for(config: ml_collections.ConfigDict) -> Any:
    """The data pipeline's TaskSpec for ``config.task``, or a registered task's own (``task_hooks``)."""
    from adapad_jax.data.tasks import get_task
    from adapad_jax.data.task_hooks import hooks_for

    hooks = hooks_for(config.task)
    if hooks is None:
        return get_task(config.task)
    return hooks.task_spec(config) if callable(hooks.task_spec) else hooks.task_spec
