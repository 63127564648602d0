"""AdaLoRA's published GLUE settings (Zhang et al. 2023b, DeBERTaV3-base), one row per task, each value from
``QingruZhang/AdaLoRA`` ``NLU/scripts/run_debertav3_<task>.sh`` (commit f6968aae).

``ADALORA_GLUE[task]`` fills ``adapter.adalora.*`` (``config.presets.glue_config`` applies it, so a GLUE config
run with ``--config.adapter.method=adalora`` gets AdaLoRA's own schedule and regulariser on the preset's shared
like-for-like settings). The scripts' names map to ours as: ``--init_warmup`` -> ``tinit``, ``--final_warmup`` ->
``tfinal``, ``--mask_interval`` -> ``deltaT``, ``--beta1`` / ``--beta2`` -> ``beta1`` / ``beta2``,
``--reg_orth_coef`` -> ``orth_reg_weight``. tinit / tfinal are steps of the published full-length runs
(``total_step`` = that run's steps), so a much shorter run is refused (``methods.adalora.AdaLoRA.schedule``).

``ADALORA_GLUE_PUBLISHED[task]``: the same scripts' shared settings, as our config fields, to reproduce AdaLoRA's
own run rather than the like-for-like comparison (docs/methods/adalora.md lists the command line):
``--lora_r`` -> ``adapter.r_max`` (init_r), ``--target_rank`` x 72 modules -> ``adapter.rank_budget`` (AdaLoRA's
target budget is target_rank per adapted matrix), ``--lora_alpha`` -> ``adapter.alpha``, ``--learning_rate``,
``--num_train_epochs``, ``--per_device_train_batch_size`` (1 GPU), ``--max_seq_length``, ``--warmup_steps``,
``--cls_dropout``, ``--weight_decay`` (HF AdamW decays every non-bias, non-LayerNorm weight, adapters included).
Every script adapts query, key, value, intermediate, layer.output and attention.output: DeBERTaV3's six defaults.
MRPC's script says ``--warmup_ratio 0.1`` rather than a step count; it is kept as the ratio here.
"""

from __future__ import annotations

from typing import Any

SOURCE = "QingruZhang/AdaLoRA NLU/scripts/run_debertav3_{task}.sh"
DEBERTA_V3_BASE_MODULES = 72  # 12 layers x 6 adapted matrices

ADALORA_GLUE: dict[str, dict[str, Any]] = {
    "cola": dict(tinit=800, tfinal=3500, deltaT=10, beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
    "mnli": dict(tinit=8000, tfinal=50000, deltaT=100, beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
    "mrpc": dict(tinit=600, tfinal=1800, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
    "qnli": dict(tinit=2000, tfinal=8000, deltaT=100, beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
    "qqp": dict(tinit=8000, tfinal=25000, deltaT=100, beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
    "rte": dict(tinit=600, tfinal=1800, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.3),
    "sst2": dict(tinit=6000, tfinal=22000, deltaT=100, beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
    "stsb": dict(tinit=800, tfinal=2000, deltaT=10, beta1=0.85, beta2=0.85, orth_reg_weight=0.3),
}


def _published(r: int, alpha: float, lr: float, epochs: int, max_length: int, warmup: Any, cls_dropout: float,
               weight_decay: float) -> dict[str, Any]:
    return {"adapter.r_max": r, "adapter.rank_budget": 1 * DEBERTA_V3_BASE_MODULES, "adapter.alpha": float(alpha),
            "optim.learning_rate": lr, "train.num_epochs": epochs, "train.batch_size": 32,
            "data.max_length": max_length, "optim.warmup_steps": warmup, "model.classifier_dropout": cls_dropout,
            "optim.weight_decay": weight_decay, "optim.adapter_weight_decay": weight_decay}


ADALORA_GLUE_PUBLISHED: dict[str, dict[str, Any]] = {
    "cola": _published(3, 32, 8e-4, 25, 64, 100, 0.10, 0.0),
    "mnli": _published(3, 16, 5e-4, 7, 256, 1000, 0.15, 0.0),
    "mrpc": _published(2, 32, 1e-3, 30, 320, "10% of the steps (--warmup_ratio 0.1)", 0.0, 0.01),
    "qnli": _published(2, 32, 5e-4, 5, 512, 500, 0.1, 0.01),
    "qqp": _published(2, 16, 8e-4, 5, 320, 2000, 0.15, 0.01),
    "rte": _published(2, 32, 1.2e-3, 50, 320, 200, 0.20, 0.01),
    "sst2": _published(2, 16, 8e-4, 24, 128, 1000, 0.0, 0.01),
    "stsb": _published(2, 32, 2.2e-3, 25, 128, 100, 0.2, 0.1),
}
