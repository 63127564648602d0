"""Your own sentence / sentence-pair classification or regression data with AdaPaD on DeBERTaV3-base.

Run (README "Your own data"; every field in docs/USAGE.md "Your own data"):
    python launch/train.py --config configs/custom.py \
        --config.data.train_file=train.tsv --config.data.validation_file=dev.tsv \
        --config.data.text_columns='("review",)' --config.data.label_column=verdict
(or adapad-train --preset custom ...). Classes, problem type and metric come from the data unless
data.label_names / data.problem_type / data.metric say otherwise; see adapad_jax.config.presets.custom_config.
"""

from adapad_jax.config.presets import custom_config


def get_config():
    """task=custom with GLUE-like AdaPaD settings (budget 144, r_max 4)."""
    return custom_config()
