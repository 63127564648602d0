"""The run configuration schema: ``base_config()`` holds every field, its default and what it means.

The checks of a config are ``adapad_jax.config.validation``; the paper's per-task settings that the files in
``configs/`` build on are ``adapad_jax.config.presets``.
"""

from __future__ import annotations

import inspect
import re

import ml_collections

from adapad_jax.runtime.compilation_cache import default_cache_dir
from adapad_jax.runtime.failures import ConfigError  # noqa: F401  (adapad_jax.config.schema.ConfigError)
from adapad_jax.data.tasks import TASKS
from adapad_jax.data.task_hooks import REGISTERED

# Every task a run accepts: the data pipeline's GLUE / SQuAD specs, then the tasks that bring their own hooks.
TASK_NAMES = tuple(TASKS) + tuple(REGISTERED)
# Every adapter.method (one module each in adapad_jax/methods/, registry.METHOD_CLASSES); the four after lora are
# the paper's Table 3 comparison methods and ARD-LoRA, each reading only its own adapter.<method>.* block below.
METHODS = ("adapad", "joint", "lora", "adalora", "increlora", "sora", "ardlora")
# The methods with a block of their own fields, adapter.<method>.* (read by that method only).
METHOD_BLOCKS = ("adalora", "increlora", "sora", "ardlora")
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("auto", "hub", "local")
SCHEDULES = ("linear", "cosine")
IMPORTANCES = ("score", "uniform")
HEAD_GRADIENTS = ("mean", "committed")
PROBLEM_TYPES = ("auto", "classification", "regression")
CUSTOM_METRICS = ("auto", "accuracy", "f1", "matthews_correlation", "pearson")



def base_config() -> ml_collections.ConfigDict:
    """Every config field with its default; task files in ``configs/`` override what differs."""
    config = ml_collections.ConfigDict()
    # One of TASK_NAMES: glue_<task>, squad, squad_v2, demo (the offline planted-rank task), or custom (your own
    # sentence / sentence-pair classification or regression data, described by the data.* fields below).
    config.task = "glue_sst2"
    # Seeds adapter init, data order, dropout and the allocator's uniform-importance draws.
    config.seed = 0
    # Where the run writes (metrics, checkpoints, adapter, ...); rerunning on it resumes.
    config.output_dir = ""
    # JAX's persistent compilation cache ("" = off); see adapad_jax/runtime/compilation_cache.py.
    config.compilation_cache_dir = default_cache_dir()

    config.model = ml_collections.ConfigDict()
    # Hub id (downloaded on first use) or a local transformers checkpoint directory.
    config.model.name_or_path = "microsoft/deberta-v3-base"
    # Hub branch, tag or commit of model.name_or_path (a hub id is downloaded on first use); "" = default branch.
    config.model.revision = ""
    # Compute dtype of the backbone: float32 or bfloat16 (adapters and optimiser state stay float32).
    config.model.dtype = "float32"
    # Dropout before the task head (classification / regression).
    config.model.classifier_dropout = 0.0

    config.data = ml_collections.ConfigDict()
    # auto: local files when given, else the hub dataset; hub; local.
    config.data.source = "auto"
    # Local files in the dataset's own schema (jsonl, json, csv, tsv, parquet); comma-separated for several splits.
    config.data.train_file = ""
    config.data.validation_file = ""
    # Tokens per example; SQuAD contexts longer than this are split into windows that overlap by doc_stride.
    config.data.max_length = 128
    config.data.doc_stride = 128
    # Use only the first N rows of each split (0 = all), for quick trials.
    config.data.max_train_examples = 0
    config.data.max_eval_examples = 0
    # Tokenised features are cached (keyed by data, tokenizer and settings) in cache_dir, "" = $ADAPAD_FEATURE_CACHE
    # or ~/.cache/adapad_jax/features.
    config.data.cache_features = True
    config.data.cache_dir = ""
    # task=custom only (docs/USAGE.md "Your own data"). Text column (one) or pair of columns, in model input order.
    config.data.text_columns = ()
    # The column holding the label: a class name or id, or a number for regression.
    config.data.label_column = "label"
    # Class names by label id; () = from the data (a hub ClassLabel's names, else the training labels sorted).
    config.data.label_names = ()
    # auto: regression when every training label is a number and some are not whole, else classification.
    config.data.problem_type = "auto"
    # auto: accuracy (+ f1 with two classes) for classification, pearson + spearmanr for regression; or one of
    # accuracy, f1 (two classes), matthews_correlation, pearson. The first is the main metric (select_best).
    config.data.metric = "auto"
    # A hub dataset ("owner/name", with its "train" and "validation" splits) instead of local files.
    config.data.dataset_name = ""
    config.data.dataset_config = ""

    config.adapter = ml_collections.ConfigDict()
    # adapad (deflated slots), joint (adapad's allocator trained in one forward, the ablation), lora (fixed rank),
    # adalora, increlora, sora, ardlora (the comparison methods; README "Methods"). A method's own fields are
    # adapter.<method>.* with the reference code's names; the shared fields below keep one meaning for all.
    config.adapter.method = "adapad"
    # Names of the linear layers to adapt; () = the family's defaults (DeBERTaV3: 6 per layer, Qwen3: 7).
    config.adapter.target_modules = ()
    # Rank-1 slots per module: the most rank one module can reach (adapad / joint).
    config.adapter.r_max = 8
    # Total rank over all modules at which growth stops (adapad / joint).
    config.adapter.rank_budget = 144
    # A budget in adapter factor parameters instead (0 = off; head excluded): when > 0 it replaces rank_budget by
    # the largest total rank B with B x mean(in + out) <= param_budget (lora: lora_rank by the largest r with
    # r x sum(in + out) <= param_budget). docs/USAGE.md "Budgets and parameter counts".
    config.adapter.param_budget = 0
    # Rank of every module for method=lora.
    config.adapter.lora_rank = 2
    # LoRA alpha: scaling s = alpha / r_max (adapad, joint) or alpha / lora_rank (lora).
    config.adapter.alpha = 16.0
    # Std of the Gaussian init of a new slot's a and b (lora: a only, b = 0).
    config.adapter.init_std = 0.02
    # Committed slots per module at the start.
    config.adapter.initial_rank = 1
    # Modules promoted (rank + 1) at each growth step.
    config.adapter.top_k = 3
    # T: steps between growth steps (the first growth is at 2T, after a warm-up round).
    config.adapter.growth_interval = 100
    # Steps between refreshes of the stop-gradient snapshot of committed slots; 0 = growth_interval.
    config.adapter.sync_every = 0
    # EMA factors of the importance |theta * grad| (beta1) and of its uncertainty |I - I_bar| (beta2).
    config.adapter.ema_beta1 = 0.85
    config.adapter.ema_beta2 = 0.85
    # score: promote the top-k by importance x uncertainty; uniform: random eligible modules (ablation).
    config.adapter.importance = "score"
    # adapad: the task head's gradient: "mean" over the L slot losses, or "committed" (the evaluated model's loss).
    config.adapter.head_gradient = "mean"
    # Train each module's reserve slot before it is promoted (False: a reserve starts from its init).
    config.adapter.advance_learning = True
    # False: fixed rank initial_rank everywhere (ablation).
    config.adapter.grow = True
    # Coefficient of AdaLoRA's orthogonality penalty (mean over factors of ||AA^T - I||_F, ||B^TB - I||_F).
    config.adapter.orth_reg = 0.0
    # Dropout on the adapter input x.
    config.adapter.dropout = 0.0
    # Memory knobs (same numbers either way; docs/USAGE.md "Memory"). slot_chunk_size: live slots per pass on each
    # device, the rest run one chunk after another under lax.scan; 0 = all live slots in one vmapped pass,
    # which holds activations for L forwards at once (8x LoRA's at L = 8). 1 holds about LoRA's.
    config.adapter.slot_chunk_size = 1
    # remat: recompute each transformer layer in the backward pass (activation checkpointing).
    config.adapter.remat = False

    # ---- adapter.adalora.*: AdaLoRA (PEFT AdaLoraConfig names). init_r = adapter.r_max, the target budget =
    # adapter.rank_budget (total over modules), lora_alpha = adapter.alpha, total_step = the run's steps.
    config.adapter.adalora = ml_collections.ConfigDict()
    # Steps of full budget before the cubic decay starts (tinit) and of frozen masks at the end (tfinal).
    config.adapter.adalora.tinit = 0
    config.adapter.adalora.tfinal = 0
    # Steps between re-masks during the decay.
    config.adapter.adalora.deltaT = 1
    # EMA factors of the sensitivity |p * grad| (beta1) and of its uncertainty (beta2).
    config.adapter.adalora.beta1 = 0.85
    config.adapter.adalora.beta2 = 0.85
    # Weight of the orthogonal regulariser on P and Q.
    config.adapter.adalora.orth_reg_weight = 0.5

    # ---- adapter.increlora.*: IncreLoRA (FeiyuZhang98/IncreLoRA run_glue.py names). incre_interval =
    # adapter.growth_interval, top_h = adapter.top_k, lora_r = adapter.initial_rank, target total = rank_budget.
    config.adapter.increlora = ml_collections.ConfigDict()
    # EMA factors of the importance and its uncertainty.
    config.adapter.increlora.beta1 = 0.85
    config.adapter.increlora.beta2 = 0.85
    # Weight of the orthogonal regulariser over each module's factors, reserves included.
    config.adapter.increlora.reg_orth_coef = 0.1
    # Ranks added per promotion; 0 = the reference's table by target rank per module ({2: 1, 4: 2, 6: 3, 8: 4}).
    config.adapter.increlora.incre_rank_num = 0
    # Steps before the first growth; 0 = adapter.growth_interval (the GLUE scripts' init_warmup = incre_interval).
    config.adapter.increlora.init_warmup = 0
    # Train reserves before promotion (advance learning); per-component warm-up restarts of the learning rate.
    config.adapter.increlora.advance_learn = True
    config.adapter.increlora.multi_lr = True

    # ---- adapter.sora.*: SoRA (TsinghuaC3I/SoRA run_glue.py names). lora_r = adapter.r_max, alpha = adapter.alpha.
    config.adapter.sora = ml_collections.ConfigDict()
    # eta: weight of mean |g| over every gate in the loss.
    config.adapter.sora.sparse_lambda = 1e-3
    # xi: the gates' soft threshold after each gate optimiser step.
    config.adapter.sora.sparse_lambda_2 = 1e-3
    # Learning rate of the gates' own AdamW; 0 = optim.learning_rate (the reference's default).
    config.adapter.sora.sparse_lr = 0.0
    # xi schedule: "" (constant), linear, log_linear or exp_linear from sparse_lambda_2 to max_lambda in lambda_num
    # values, one per stage of stage_steps steps (the reference's stages are 15 epochs after the main run; 0 = one
    # stage, xi constant; a schedule needs stage_steps >= 1).
    config.adapter.sora.lambda_schedule = ""
    config.adapter.sora.max_lambda = 10.0
    config.adapter.sora.lambda_num = 10
    config.adapter.sora.stage_steps = 0

    # ---- adapter.ardlora.*: ARD-LoRA (our choices where the paper gives none; docs/methods/ardlora.md). r0 =
    # adapter.initial_rank, the cap = adapter.r_max.
    config.adapter.ardlora = ml_collections.ConfigDict()
    # lambda: weight of the regulariser l1(alpha) + beta * TV(alpha) in the meta-objective.
    config.adapter.ardlora.lam = 1e-3
    # beta: weight of the total variation of alpha across layers.
    config.adapter.ardlora.beta = 0.1
    # Temperature of the soft slot mask whose gradient stands in for the rounding's.
    config.adapter.ardlora.tau = 0.5
    # Learning rate of the scaling factors alpha; 0 = optim.learning_rate.
    config.adapter.ardlora.alpha_lr = 0.0

    config.optim = ml_collections.ConfigDict()
    # Peak AdamW learning rate (after warmup).
    config.optim.learning_rate = 5e-4
    # AdamW weight decay of the task head; adapter_weight_decay is the adapters'.
    config.optim.weight_decay = 0.01
    config.optim.adapter_weight_decay = 0.0
    # Linear warmup, then the schedule (linear or cosine decay to 0 at the last step).
    config.optim.warmup_steps = 100
    config.optim.schedule = "linear"
    # Global-norm gradient clipping (0 = off).
    config.optim.grad_clip = 1.0
    # AdamW moments and epsilon (bias correction counted per slot from its activation).
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-6

    config.train = ml_collections.ConfigDict()
    # Length of the run: num_steps when >= 0 (0 = evaluate and export only), else num_epochs over the data.
    config.train.num_epochs = 1
    config.train.num_steps = -1
    # A resume may change the run's length (num_steps / num_epochs) only with extend_schedule=True: the learning-rate
    # schedule is then re-planned for the new length from the resumed step on (printed, and recorded in resumes.jsonl).
    config.train.extend_schedule = False
    # Global batch sizes (split over mesh.data).
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    # Gradient accumulation: each optimizer step runs its batch_size batch as this many micro-batches in turn
    # (batch_size / (grad_accum_steps x mesh.data) rows per device at a time) and sums their gradients, so the step
    # is the full batch's (same numbers, to float rounding) with a micro-batch's activation memory (USAGE.md "Memory").
    config.train.grad_accum_steps = 1
    # Evaluate every N steps during training (0 = only at the end).
    config.train.eval_every_steps = 0
    # A metrics.jsonl record and a progress line every N steps (and at the last); adapad runs the forward behind
    # the logged loss (the committed model's) on these steps only.
    config.train.log_every_steps = 10
    # select_best: evaluate every eval_every_steps (and at the end), keep the checkpoint with the best main metric
    # (adapad_jax.metrics.main_metric) out of the checkpoint rotation, and export the adapter from it.
    # Off by default (the adapter is the last step's); the GLUE/SQuAD presets turn it on, as the paper reports
    # best dev scores.
    config.train.select_best = False
    # Profile steps profile_start_step .. profile_start_step + profile_num_steps - 1 (1-based; 0 = off) with
    # jax.profiler into output_dir/profile: TensorBoard (tensorboard --logdir <output_dir>/profile, with the
    # tensorboard-plugin-profile package) or Perfetto (perfetto_trace.json.gz). Start after step 1 (compilation).
    config.train.profile_start_step = 0
    config.train.profile_num_steps = 3

    config.checkpoint = ml_collections.ConfigDict()
    # Orbax checkpoint every N steps (and at the end); keep the newest `keep` (+ the best with select_best).
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 3

    config.mesh = ml_collections.ConfigDict()
    # Device mesh: the batch splits over `data`, the live slots over `components` (must divide r_max).
    config.mesh.data = 1
    config.mesh.components = 1

    config.logging = ml_collections.ConfigDict()
    # TensorBoard event files (scalars, per-module ranks, the rank heatmap) in output_dir, written with tensorboardX
    # (no TensorFlow): tensorboard --logdir <output_dir or its parent>.
    config.logging.tensorboard = True
    # Log the same to Weights & Biases (`pip install adapad_jax[wandb]`, then `wandb login` or WANDB_MODE=offline).
    config.logging.wandb = False
    # W&B project and entity; "" = $WANDB_PROJECT / $WANDB_ENTITY, else W&B's default. A project also turns W&B on.
    config.logging.wandb_project = ""
    config.logging.wandb_entity = ""
    # W&B run name ("" = output_dir's name), comma-separated tags and group, to tell runs apart on the board.
    config.logging.wandb_name = ""
    config.logging.wandb_tags = ""
    config.logging.wandb_group = ""
    return config


def field_docs() -> dict[str, str]:
    """``{dotted field: its comment in base_config}`` (a comment covers the assignments right below it)."""
    docs: dict[str, str] = {}
    comment: list[str] = []
    after_assignment = False
    for line in inspect.getsource(base_config).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment = ([] if after_assignment else comment) + [text.lstrip("#").strip()]
            after_assignment = False
        elif match := re.match(r"config\.([\w.]+) = ", text):
            if "ConfigDict()" not in text:
                docs[match.group(1)] = " ".join(comment)
            after_assignment = True
        else:  # a blank line or anything else ends the comment's reach
            comment, after_assignment = [], False
    return docs
