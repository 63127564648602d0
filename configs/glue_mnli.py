"""GLUE MNLI with AdaPaD on DeBERTaV3-base (paper Table 8 settings; metric: accuracy on validation_matched and validation_mismatched).

Run:
    python launch/train.py --config configs/glue_mnli.py
Offline, with local files in the GLUE schema and a local checkpoint:
    python launch/train.py --config configs/glue_mnli.py \
        --config.model.name_or_path=/path/to/deberta-v3-base \
        --config.data.train_file=train.jsonl --config.data.validation_file=dev_matched.jsonl,dev_mismatched.jsonl
Writes metrics.jsonl, eval_results.json, predictions.jsonl, checkpoints/, adapter/ (PEFT), ranks.json,
ranks.png and config.json to --config.output_dir (default runs/glue_mnli). The learning rate is not in the
paper text we have: see adapad_jax.config.presets.GLUE_LEARNING_RATES.
r_max is 4 (inferred: the paper's CoLA histogram of 72 modules, 16/44/8/4, sums to the budget 144
only for ranks 1, 2, 3, 4), so the scaling is alpha / 4; see adapad_jax.config.presets.glue_config.
"""

from adapad_jax.config.presets import glue_config


def get_config():
    """The paper's MNLI row: epochs 9, batch 256, alpha 24, warmup 500, top-k 2, T 100."""
    return glue_config(
        "mnli",
        epochs=9,
        batch_size=256,
        alpha=24,
        warmup=500,
        top_k=2,
        growth_interval=100,
        orth_reg=0.1,
        adapter_dropout=0.2,
        classifier_dropout=0.15,
        adapter_weight_decay=0.0,
        schedule="cosine",
    )
