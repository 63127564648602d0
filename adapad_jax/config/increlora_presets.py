"""IncreLoRA's published GLUE settings (``FeiyuZhang98/IncreLoRA``), in the config layer so presets can read them.

DeBERTaV3-base, ``--target_rank 2 --lora_r 1`` (one rank per promotion), batch 32, and in every script
``--warmup_steps`` = ``--init_warmup`` = ``--incre_interval``. Each task's values come from the file named in its
comment; ``methods/increlora.py`` re-exports this table and ``tests/test_increlora_rules.py`` checks it against
/work/shared/docs/BASELINES.md.
"""

from __future__ import annotations

from typing import Any

GLUE_SETTINGS: dict[str, dict[str, Any]] = {
    # NLU/scripts/rank=2/run_cola.sh
    "cola": {"lr": 8e-4, "top_h": 3, "interval": 100, "max_len": 64, "orth": 0.1, "epochs": 25, "batch": 32,
             "lora_alpha": 32, "lora_dropout": 0.0, "cls_dropout": 0.1, "weight_decay": 0.0},
    # NLU/scripts/rank=2/run_mrpc.sh
    "mrpc": {"lr": 1e-3, "top_h": 6, "interval": 100, "max_len": 320, "orth": 0.1, "epochs": 30, "batch": 32,
             "lora_alpha": 32, "lora_dropout": 0.3, "cls_dropout": 0.0, "weight_decay": 0.01},
    # NLU/scripts/rank=2/run_rte.sh
    "rte": {"lr": 1.2e-3, "top_h": 5, "interval": 100, "max_len": 320, "orth": 0.3, "epochs": 50, "batch": 32,
            "lora_alpha": 32, "lora_dropout": 0.0, "cls_dropout": 0.2, "weight_decay": 0.01},
    # NLU/scripts/rank=8/run_stsb.sh (rank=2/ has no STS-B script; this one sets target_rank=2 itself)
    "stsb": {"lr": 2.2e-3, "top_h": 4, "interval": 100, "max_len": 128, "orth": 0.3, "epochs": 25, "batch": 32,
             "lora_alpha": 32, "lora_dropout": 0.0, "cls_dropout": 0.2, "weight_decay": 0.1},
    # NLU/scripts/rank=2/run_sst2.sh
    "sst2": {"lr": 8e-4, "top_h": 5, "interval": 1000, "max_len": 128, "orth": 0.1, "epochs": 24, "batch": 32,
             "lora_alpha": 16, "lora_dropout": 0.1, "cls_dropout": 0.0, "weight_decay": 0.01},
    # NLU/scripts/rank=2/run_qqp.sh
    "qqp": {"lr": 4e-4, "top_h": 3, "interval": 1000, "max_len": 320, "orth": 0.1, "epochs": 7, "batch": 32,
            "lora_alpha": 16, "lora_dropout": 0.0, "cls_dropout": 0.15, "weight_decay": 0.01},
    # NLU/scripts/rank=2/run_mnli.sh
    "mnli": {"lr": 3.5e-4, "top_h": 2, "interval": 1000, "max_len": 256, "orth": 0.1, "epochs": 9, "batch": 32,
             "lora_alpha": 16, "lora_dropout": 0.2, "cls_dropout": 0.15, "weight_decay": 0.0},
    # NLU/scripts/rank=2/run_qnli.sh
    "qnli": {"lr": 7e-4, "top_h": 12, "interval": 500, "max_len": 512, "orth": 0.1, "epochs": 5, "batch": 32,
             "lora_alpha": 32, "lora_dropout": 0.0, "cls_dropout": 0.1, "weight_decay": 0.01},
}
GLUE_TARGET_RANK = 2
GLUE_LORA_R = 1
# INCRE_RANK_NUM of loralib/loralib/increlora.py (RankAllocator.__init__'s rank_dic) at GLUE_TARGET_RANK.
GLUE_INCRE_RANK_NUM = 1


def glue_method_block(task: str) -> dict[str, Any]:
    """``adapter.increlora.*`` for a GLUE task: the script's orth coefficient and one rank per promotion.

    The shared fields (lr, top_h, interval, max length, epochs, alpha...) stay the preset's like-for-like
    values; docs/methods/increlora.md lists the overrides for IncreLoRA's own published run.
    """
    return {"reg_orth_coef": GLUE_SETTINGS[task]["orth"], "incre_rank_num": GLUE_INCRE_RANK_NUM}
