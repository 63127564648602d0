"""GLUE QNLI with AdaPaD on DeBERTaV3-base (paper Table 8 settings; metric: accuracy).

Run:
    python launch/train.py --config configs/glue_qnli.py
Offline, with local files in the GLUE schema and a local checkpoint:
    python launch/train.py --config configs/glue_qnli.py \
        --config.model.name_or_path=/path/to/deberta-v3-base \
        --config.data.train_file=train.jsonl --config.data.validation_file=dev.jsonl
Writes metrics.jsonl, eval_results.json, predictions.jsonl, checkpoints/, adapter/ (PEFT), ranks.json,
ranks.png and config.json to --config.output_dir (default runs/glue_qnli). The learning rate is not in the
paper text we have: see adapad_jax.config.presets.GLUE_LEARNING_RATES.
r_max is 4 (inferred: the paper's CoLA histogram of 72 modules, 16/44/8/4, sums to the budget 144
only for ranks 1, 2, 3, 4), so the scaling is alpha / 4; see adapad_jax.config.presets.glue_config.
"""

from adapad_jax.config.presets import glue_config


def get_config():
    """The paper's QNLI row: epochs 5, batch 64, alpha 32, warmup 500, top-k 3, T 50."""
    return glue_config(
        "qnli",
        epochs=5,
        batch_size=64,
        alpha=32,
        warmup=500,
        top_k=3,
        growth_interval=50,
        orth_reg=0.2,
        adapter_dropout=0.0,
        classifier_dropout=0.0,
        adapter_weight_decay=0.0,
        schedule="linear",
    )
