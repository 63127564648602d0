"""SQuAD v1.1 with AdaPaD on Qwen3-0.6B (paper Table 9 settings; metric: F1 / exact match).

Run:
    python launch/train.py --config configs/squad.py
Offline, with a local checkpoint and local files in the SQuAD schema (id, title, context, question, answers):
    python launch/train.py --config configs/squad.py --config.model.name_or_path=/path/to/Qwen3-0.6B \
        --config.data.train_file=train.json --config.data.validation_file=dev.json
3 epochs, batch 16, max length 384, stride 128, alpha 16, warmup 1000, top-k 10, T 400, r_max 8,
budget 784 (average rank 4), bf16 compute. Paper Table 5's fixed-rank baseline at this budget is LoRA r = 4:
    python launch/train.py --config configs/squad.py --config.adapter.method=lora
(adapter.lora_rank is 4 here). Budget 1176 (average rank 6) against LoRA r = 6: configs/squad_1176.py.
Writes metrics.jsonl, eval_results.json, predictions.jsonl (id, prediction_text),
checkpoints/, adapter/ (PEFT), ranks.json, ranks.png and config.json to --config.output_dir (default runs/squad).
"""

from adapad_jax.config.presets import squad_config


def get_config():
    """The paper's SQuAD v1.1 settings."""
    return squad_config(version_2=False)
