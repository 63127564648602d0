"""The run configuration: ``base_config()`` (every field and its default) and up-front validation.

``validate_config`` checks a config before any compute and before the output directory is touched: field
values, the model checkpoint (its ``config.json`` only, to count the adapted modules), the budget against
that count, the mesh against the devices and ``r_max``, and the local data files. Every problem is raised
as one ``ConfigError`` whose message names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import ml_collections

from adapad_jax.compilation_cache import default_cache_dir

TASK_NAMES = (
    "glue_cola",
    "glue_sst2",
    "glue_mrpc",
    "glue_qqp",
    "glue_stsb",
    "glue_mnli",
    "glue_qnli",
    "glue_rte",
    "squad",
    "squad_v2",
    "demo",
)
METHODS = ("adapad", "joint", "lora")
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("auto", "hub", "tfds", "local")
SCHEDULES = ("linear", "cosine")
IMPORTANCES = ("score", "uniform")
# Fields that must not change when a run is resumed from the checkpoints in its output directory.
RESUME_INVARIANT_FIELDS = (
    "task",
    "seed",
    "model.name_or_path",
    "adapter.method",
    "adapter.target_modules",
    "adapter.r_max",
    "adapter.lora_rank",
    "adapter.initial_rank",
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the problem."""


def base_config() -> ml_collections.ConfigDict:
    """Every config field with its default; task files in ``configs/`` override what differs."""
    config = ml_collections.ConfigDict()
    config.task = "glue_sst2"
    config.seed = 0
    config.output_dir = ""
    # JAX's persistent compilation cache ("" = off); see adapad_jax/compilation_cache.py.
    config.compilation_cache_dir = default_cache_dir()

    config.model = ml_collections.ConfigDict()
    config.model.name_or_path = "microsoft/deberta-v3-base"
    config.model.dtype = "float32"
    config.model.classifier_dropout = 0.0

    config.data = ml_collections.ConfigDict()
    config.data.source = "auto"
    config.data.train_file = ""
    config.data.validation_file = ""
    config.data.max_length = 128
    config.data.doc_stride = 128
    config.data.max_train_examples = 0
    config.data.max_eval_examples = 0
    # Tokenised features are cached (keyed by data, tokenizer and settings) in cache_dir, "" = $ADAPAD_FEATURE_CACHE
    # or ~/.cache/adapad_jax/features.
    config.data.cache_features = True
    config.data.cache_dir = ""

    config.adapter = ml_collections.ConfigDict()
    config.adapter.method = "adapad"
    config.adapter.target_modules = ()
    config.adapter.r_max = 8
    config.adapter.rank_budget = 144
    config.adapter.lora_rank = 2
    config.adapter.alpha = 16.0
    config.adapter.init_std = 0.02
    config.adapter.initial_rank = 1
    config.adapter.top_k = 3
    config.adapter.growth_interval = 100
    config.adapter.sync_every = 0
    config.adapter.ema_beta1 = 0.85
    config.adapter.ema_beta2 = 0.85
    config.adapter.importance = "score"
    config.adapter.advance_learning = True
    config.adapter.grow = True
    config.adapter.orth_reg = 0.0
    config.adapter.dropout = 0.0
    # Memory knobs (same numbers either way; see README "Memory"). slot_chunk_size: live slots per pass on each
    # device, the rest run one chunk after another under lax.scan; 0 = all live slots in one vmapped pass,
    # which holds activations for L forwards at once (8x LoRA's at L = 8). 1 holds about LoRA's.
    config.adapter.slot_chunk_size = 1
    # remat: recompute each transformer layer in the backward pass (activation checkpointing).
    config.adapter.remat = False

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 5e-4
    config.optim.weight_decay = 0.01
    config.optim.adapter_weight_decay = 0.0
    config.optim.warmup_steps = 100
    config.optim.schedule = "linear"
    config.optim.grad_clip = 1.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-6

    config.train = ml_collections.ConfigDict()
    config.train.num_epochs = 1
    config.train.num_steps = -1
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.train.eval_every_steps = 0
    config.train.log_every_steps = 10

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 3

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1
    config.mesh.components = 1
    return config


@dataclasses.dataclass
class CheckedRun:
    """What validation learned on the way: the task spec, the checkpoint's config and the module count."""

    task_spec: Any  # adapad_jax.data.tasks.TaskSpec
    checkpoint_dir: Any  # pathlib.Path
    hf_config: Any  # transformers.PretrainedConfig
    num_modules: int


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


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Check every field's type and range (no file or device access)."""
    integer, real = (int,), (int, float)
    _require_choice(config, "task", TASK_NAMES)
    _require_type(config, "seed", integer)
    _require_type(config, "compilation_cache_dir", (str,))
    if not _require_type(config, "output_dir", (str,)).strip():
        raise ConfigError("output_dir is empty: give --config.output_dir=<directory for this run's outputs>")
    if not _require_type(config, "model.name_or_path", (str,)).strip():
        raise ConfigError("model.name_or_path is empty: give a hub id or a local checkpoint directory")
    _require_choice(config, "model.dtype", DTYPES)
    _require_range(config, "model.classifier_dropout", real, 0.0, 1.0, high_open=True)

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

    method = _require_choice(config, "adapter.method", METHODS)
    targets = _get(config, "adapter.target_modules")
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not all(
        isinstance(t, str) and t for t in targets
    ):
        raise ConfigError(f"adapter.target_modules must be a tuple of module names, got {targets!r}")
    r_max = _require_range(config, "adapter.r_max", integer, 1)
    _require_range(config, "adapter.rank_budget", integer, 1)
    _require_range(config, "adapter.lora_rank", integer, 1)
    _require_range(config, "adapter.alpha", real, 0.0)
    _require_range(config, "adapter.init_std", real, 0.0)
    initial_rank = _require_range(config, "adapter.initial_rank", integer, 1)
    if method != "lora" and initial_rank > r_max:
        raise ConfigError(f"adapter.initial_rank={initial_rank} is larger than adapter.r_max={r_max}")
    _require_range(config, "adapter.top_k", integer, 1)
    _require_range(config, "adapter.growth_interval", integer, 1)
    _require_range(config, "adapter.sync_every", integer, 0)
    _require_range(config, "adapter.ema_beta1", real, 0.0, 1.0, high_open=True)
    _require_range(config, "adapter.ema_beta2", real, 0.0, 1.0, high_open=True)
    _require_choice(config, "adapter.importance", IMPORTANCES)
    _require_type(config, "adapter.advance_learning", (bool,))
    _require_type(config, "adapter.grow", (bool,))
    _require_range(config, "adapter.orth_reg", real, 0.0)
    _require_range(config, "adapter.dropout", real, 0.0, 1.0, high_open=True)
    _require_range(config, "adapter.slot_chunk_size", integer, 0)
    _require_type(config, "adapter.remat", (bool,))

    _require_range(config, "optim.learning_rate", real, 0.0)
    if config.optim.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate={config.optim.learning_rate} must be > 0")
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
    batch = _require_range(config, "train.batch_size", integer, 1)
    eval_batch = _require_range(config, "train.eval_batch_size", integer, 1)
    _require_range(config, "train.eval_every_steps", integer, 0)
    _require_range(config, "train.log_every_steps", integer, 1)

    _require_range(config, "checkpoint.every_steps", integer, 0)
    _require_range(config, "checkpoint.keep", integer, 1)

    data = _require_range(config, "mesh.data", integer, 1)
    components = _require_range(config, "mesh.components", integer, 1)
    if method != "lora" and r_max % components:
        divisors = [c for c in range(1, r_max + 1) if r_max % c == 0]
        raise ConfigError(
            f"mesh.components={components} does not divide adapter.r_max={r_max}: the slot axis is split over "
            f"the components axis; use one of {divisors}"
        )
    if batch % data:
        raise ConfigError(f"train.batch_size={batch} is not divisible by mesh.data={data}")
    if eval_batch % data:
        raise ConfigError(f"train.eval_batch_size={eval_batch} is not divisible by mesh.data={data}")


def check_mesh(config: ml_collections.ConfigDict, num_devices: int, platform: str = "") -> None:
    """The mesh must fit the devices this process sees."""
    need = config.mesh.data * config.mesh.components
    if need > num_devices:
        raise ConfigError(
            f"mesh.data={config.mesh.data} x mesh.components={config.mesh.components} needs {need} devices but only "
            f"{num_devices} {platform + ' ' if platform else ''}device(s) are available"
        )


def count_adapter_targets(hf_config: Any, task_kind: str, target_modules: Sequence[str]) -> int:
    """How many modules a model built from ``hf_config`` adapts (reads the config only, builds nothing)."""
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import targets_for_config

    try:
        return len(targets_for_config(hf_config, task_kind, tuple(target_modules) or None))
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        raise ConfigError(f"adapter.target_modules: {err}") from None


def check_model(config: ml_collections.ConfigDict, task_kind: str) -> tuple[Any, Any, int]:
    """Find the checkpoint, read its config.json and check the budget against the module count."""
    from adapad_jax.models.checkpoint_io import CheckpointError
    from adapad_jax.models.registry import load_hf_config

    try:
        checkpoint_dir, hf_config = load_hf_config(config.model.name_or_path)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    num_modules = count_adapter_targets(hf_config, task_kind, config.adapter.target_modules)
    adapter = config.adapter
    if adapter.method != "lora" and adapter.grow and adapter.rank_budget < num_modules * adapter.initial_rank:
        raise ConfigError(
            f"adapter.rank_budget={adapter.rank_budget} is below the {num_modules} adapted modules x "
            f"adapter.initial_rank={adapter.initial_rank} = {num_modules * adapter.initial_rank} of "
            f"'{config.model.name_or_path}': every module starts with rank {adapter.initial_rank}"
        )
    return checkpoint_dir, hf_config, num_modules


def check_resume(config: ml_collections.ConfigDict, previous_config_json: str) -> None:
    """A rerun on an output_dir with checkpoints must keep the fields that shape the checkpointed state."""
    try:
        previous = json.loads(previous_config_json)
    except json.JSONDecodeError:
        return
    current = json.loads(config.to_json())
    for dotted in RESUME_INVARIANT_FIELDS:
        old, new = previous, current
        for part in dotted.split("."):
            old = old.get(part) if isinstance(old, dict) else None
            new = new.get(part) if isinstance(new, dict) else None
        if old is not None and old != new:
            raise ConfigError(
                f"output_dir '{config.output_dir}' holds a run with {dotted}={old!r}, this config has {new!r}; "
                f"use another output_dir (or the same {dotted}) to resume"
            )


def validate_config(
    config: ml_collections.ConfigDict, *, num_devices: int | None = None, platform: str = ""
) -> CheckedRun:
    """Every up-front check, in order: fields, mesh, model checkpoint and budget, data files."""
    from adapad_jax.data.loading import validate_data_files
    from adapad_jax.data.tasks import DataError

    check_fields(config)
    if num_devices is not None:
        check_mesh(config, num_devices, platform)
    task_spec = task_spec_for(config)
    checkpoint_dir, hf_config, num_modules = check_model(config, task_spec.kind)
    if config.data.source in ("hub", "tfds") and (config.data.train_file or config.data.validation_file):
        raise ConfigError(
            f"data.source={config.data.source} cannot be combined with data.train_file / data.validation_file"
        )
    if config.data.source == "local" and not (config.data.train_file or config.data.validation_file):
        raise ConfigError("data.source=local needs data.train_file and/or data.validation_file")
    if config.train.num_steps != 0 and config.data.validation_file and not config.data.train_file:
        raise ConfigError("data.validation_file is given without data.train_file: give both (or num_steps=0)")
    try:
        validate_data_files(task_spec, config.data.train_file, config.data.validation_file)
    except DataError as err:
        raise ConfigError(str(err)) from None
    return CheckedRun(task_spec, checkpoint_dir, hf_config, num_modules)


def task_spec_for(config: ml_collections.ConfigDict) -> Any:
    """The data pipeline's TaskSpec for ``config.task`` (the demo is single-sentence binary classification)."""
    from adapad_jax.data.tasks import get_task

    if config.task == "demo":
        from adapad_jax.demo import DEMO_TASK

        return DEMO_TASK
    return get_task(config.task)


# ----------------------------------------------------------------------------------------------------------
# Paper settings (SPEC section 4) shared by the files in configs/.

# The paper text lost its learning rates. These are AdaLoRA's published DeBERTaV3-base learning rates
# (Zhang et al. 2023, whose GLUE protocol the paper's Table 8 follows); they are untuned starting points.
GLUE_LEARNING_RATES = {
    "cola": 5e-4,
    "sst2": 8e-4,
    "mrpc": 1e-3,
    "qqp": 5e-4,
    "stsb": 2.2e-3,
    "mnli": 5e-4,
    "qnli": 1.2e-3,
    "rte": 1.2e-3,
}
# Qwen3-0.6B SQuAD: 2e-4 is the usual LoRA learning rate for sub-1B decoders with AdamW and warmup 1000.
SQUAD_LEARNING_RATE = 2e-4


def glue_config(
    task: str,
    *,
    epochs: int,
    batch_size: int,
    alpha: float,
    warmup: int,
    top_k: int,
    growth_interval: int,
    orth_reg: float,
    adapter_dropout: float,
    classifier_dropout: float,
    adapter_weight_decay: float,
    schedule: str,
) -> ml_collections.ConfigDict:
    """A GLUE task on DeBERTaV3-base with the paper's Table 8 row (max length 128, budget 144, r_max 8)."""
    config = base_config()
    config.task = f"glue_{task}"
    config.output_dir = f"runs/glue_{task}"
    config.model.name_or_path = "microsoft/deberta-v3-base"
    config.model.classifier_dropout = classifier_dropout
    config.data.max_length = 128
    config.adapter.r_max = 8
    config.adapter.rank_budget = 144
    config.adapter.alpha = float(alpha)
    config.adapter.top_k = top_k
    config.adapter.growth_interval = growth_interval
    config.adapter.orth_reg = orth_reg
    config.adapter.dropout = adapter_dropout
    config.optim.learning_rate = GLUE_LEARNING_RATES[task]
    config.optim.weight_decay = 0.01
    config.optim.adapter_weight_decay = adapter_weight_decay
    config.optim.warmup_steps = warmup
    config.optim.schedule = schedule
    config.optim.grad_clip = 1.0
    config.train.num_epochs = epochs
    config.train.batch_size = batch_size
    config.train.eval_batch_size = 128
    config.train.eval_every_steps = 1000
    config.checkpoint.every_steps = 1000
    return config


def squad_config(version_2: bool) -> ml_collections.ConfigDict:
    """SQuAD v1.1 / v2 on Qwen3-0.6B with the paper's Table 9 settings (budget 784 = average rank 4)."""
    config = base_config()
    config.task = "squad_v2" if version_2 else "squad"
    config.output_dir = f"runs/{config.task}"
    config.model.name_or_path = "Qwen/Qwen3-0.6B"
    config.model.dtype = "bfloat16"
    config.data.max_length = 384
    config.data.doc_stride = 128
    config.adapter.r_max = 8
    config.adapter.rank_budget = 784
    config.adapter.alpha = 16.0
    config.adapter.top_k = 10
    config.adapter.growth_interval = 400
    config.adapter.orth_reg = 0.0
    config.adapter.dropout = 0.0
    config.optim.learning_rate = SQUAD_LEARNING_RATE
    config.optim.weight_decay = 0.0
    config.optim.adapter_weight_decay = 0.0
    config.optim.warmup_steps = 1000
    config.optim.schedule = "linear"
    config.optim.grad_clip = 1.0
    config.train.num_epochs = 3
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_every_steps = 0
    config.checkpoint.every_steps = 1000
    return config
