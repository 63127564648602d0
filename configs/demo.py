"""Offline demo (the README's main command): AdaPaD learns a planted-rank teacher task and shows where rank went.

Run:
    python launch/train.py --config configs/demo.py

No network. Builds once (cached in ~/.cache/adapad_jax/demo, or --config.demo.assets_dir) a random
DeBERTaV3-architecture backbone (hidden 64, 2 layers, 12 adapted modules) with a SentencePiece tokenizer,
and a 6-class task whose labels come from a teacher = backbone + planted adapter deltas of rank 4, 3 and 2
in three FFN modules (rank 0 elsewhere; see adapad_jax/studies/demo.py for why these modules and six classes). Then trains AdaPaD (r_max 4, budget 21 = 12 modules x rank 1 + 9)
for a few hundred steps and prints validation accuracy against chance and against the backbone alone, plus
a planted-vs-found rank table with its agreement (share of rank on planted modules, Spearman). Then, because
in a transformer other modules can stand in for a planted one, it trains AdaPaD on the planted benchmark's
`branches` toy task (launch/planted.py; each planted delta learnable only by its own module, about a minute;
--config.demo.branches_check=False skips it) and prints that table and agreement too.
Outputs in runs/demo: metrics.jsonl, eval_results.json, predictions.jsonl, checkpoints/, adapter/ (PEFT),
ranks.json, ranks.png, planted_vs_found.png, planted_vs_found.json, planted_vs_found_branches.json, config.json.
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
