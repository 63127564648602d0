"""SQuAD v2.0 with AdaPaD on Qwen3-0.6B at budget 1176 (average rank 6; paper Tables 5 and 9).

Run:
    python launch/train.py --config configs/squad_v2_1176.py
The paper's fixed-rank baseline at this budget, LoRA r = 6 (adapter.lora_rank is 6 here):
    python launch/train.py --config configs/squad_v2_1176.py --config.adapter.method=lora
Same settings as configs/squad_v2.py otherwise (3 epochs, batch 16, max length 384, stride 128, alpha 16,
warmup 1000, top-k 10, T 400, r_max 8, bf16 compute). Writes to --config.output_dir (default runs/squad_v2_1176).
"""

from adapad_jax.config.presets import squad_config


def get_config():
    """The paper's SQuAD v2.0 settings at budget 1176, LoRA baseline r = 6."""
    config = squad_config(version_2=True, rank_budget=1176)
    config.output_dir = "runs/squad_v2_1176"
    return config
