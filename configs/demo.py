"""Offline demo (the README's main command): AdaPaD against fixed-rank LoRA and another adaptive method where
allocation matters, then an end-to-end DeBERTaV3-architecture run.

Run:
    python launch/train.py --config configs/demo.py

No network. Builds once (cached in ~/.cache/adapad_jax/demo, or --config.demo.assets_dir) a random
DeBERTaV3-architecture backbone (hidden 64, 2 layers, 12 adapted modules) with a SentencePiece tokenizer,
and a 6-class task whose labels come from a teacher = backbone + planted adapter deltas of rank 4, 3 and 2
in three FFN modules (rank 0 elsewhere; see adapad_jax/studies/demo.py for why these modules and six classes),
and trains AdaPaD on it (r_max 4, budget 21 = 12 modules x rank 1 + 9) for a few hundred steps.
The report leads with the comparison: on the planted benchmark's `branches` toy task (launch/planted.py; each
planted delta learnable only by its own module), AdaPaD, fixed-rank LoRA (rank 2) and demo.other_methods
(default sora, the best published adaptive method there in docs/RESULTS.md; comma-separated
adapter.method names) at the same budget 16, each trained to a plateau:
held-out error and planted-vs-found ranks per module, with a picture (--config.demo.branches_check=False skips
it). Then the DeBERTa-architecture run as the pipeline check (tokenizer, model, PEFT export): validation accuracy
against chance and the backbone alone, and its planted-vs-found table (in a transformer other modules can
stand in for a planted one, so the ranks need not follow the planted ones there).
Outputs in runs/demo: comparison_branches.png, comparison_branches.json, metrics.jsonl, eval_results.json,
predictions.jsonl, checkpoints/, adapter/ (PEFT), ranks.json, ranks.png, planted_vs_found.png,
planted_vs_found.json, config.json.
"""

from adapad_jax.config.schema import base_config
from adapad_jax.studies.demo import PLACEHOLDER_MODEL, demo_settings


def get_config():
    """Demo settings: tiny backbone, planted-rank teacher task, a few minutes on 2 CPU cores."""
    config = base_config()
    config.task = "demo"
    config.output_dir = "runs/demo"
    config.model.name_or_path = PLACEHOLDER_MODEL  # replaced by the demo backbone's directory
    config.demo = demo_settings()
    config.data.max_length = config.demo.max_length
    config.adapter.method = "adapad"
    config.adapter.r_max = 4
    config.adapter.rank_budget = 21
    config.adapter.alpha = 4.0
    config.adapter.init_std = 0.02
    config.adapter.top_k = 1
    config.adapter.growth_interval = 20
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.0
    config.train.num_epochs = 1
    config.train.num_steps = 300
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.train.eval_every_steps = 100
    config.train.log_every_steps = 10
    config.checkpoint.every_steps = 100
    return config
