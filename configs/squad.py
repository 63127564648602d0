"""SQuAD v1.1 with AdaPaD on Qwen3-0.6B (paper Table 9 settings; metric: F1 / exact match).

Run:
    python launch/train.py --config configs/squad.py
Offline, with a local checkpoint and local files in the SQuAD schema (id, title, context, question, answers):
    python launch/train.py --config configs/squad.py --config.model.name_or_path=/path/to/Qwen3-0.6B \
        --config.data.train_file=train.json --config.data.validation_file=dev.json
3 epochs, batch 16, max length 384, stride 128, alpha 16, warmup 1000, top-k 10, T 400, r_max 8,
budget 784 (average rank 4; --config.adapter.rank_budget=1176 for average rank 6), bf16 compute.
Writes metrics.jsonl, eval_results.json, predictions.jsonl (id, prediction_text),
checkpoints/, adapter/ (PEFT), ranks.json, ranks.png and config.json to --config.output_dir (default runs/squad).
"""

from adapad_jax.config import squad_config


def get_config():
    """The paper's SQuAD v1.1 settings."""
    return squad_config(version_2=False)
