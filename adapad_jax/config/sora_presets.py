"""SoRA's published GLUE settings (``TsinghuaC3I/SoRA``), for ``adapter.sora.*`` and as documented overrides.

The reference publishes two GLUE scripts, nothing per task beyond them:

- ``scripts/run_glue_sora_no_schedule.sh`` (STS-B): ``sparse_lambda`` (eta) 10, ``sparse_lambda_2`` (xi) 3e-4,
  ``lora_r`` 8, lr 8e-4, 20 epochs, batch 8, ``max_grad_norm`` 0.1, weight decay 0.1, warm-up ratio 0.06,
  max length 128;
- ``scripts/run_glue_sora_schedule_dense.sh`` (RTE): eta 1e-3, xi 0 in the main run, then ``lambda_schedule``
  linear to ``max_lambda`` 7e-4 over ``lambda_num`` 7 values, one per further 15-epoch stage; ``lora_r`` 8,
  lr 1.2e-3, 50 epochs, batch 32, clip 0.1, weight decay 0.1, warm-up ratio 0.06, max length 320.

Every other task takes ``run_glue.py``'s ``SparseArguments`` defaults (eta 1e-3, xi 1e-3). ``sparse_lr`` is 0
everywhere (= ``optim.learning_rate``, the reference's default). The RTE stages after the main run are not run by
``glue_config`` (see ``docs/methods/sora.md``): they continue with both schedulers already at 0, i.e. they only
threshold the gates; the preset is the main run's xi (0).

``TABLE3_BUDGET``: the AdaPaD paper's Table 3 row "SoRA, 0.47M" is SoRA's r = 4 run; a preset of r = 4 with the
STS-B script's eta / xi, chosen as the only published no-schedule pair. Whether it lands at 0.47M on a given task
cannot be checked offline (no GLUE data here); ``docs/methods/sora.md`` says how to read the count.
"""

from __future__ import annotations

from typing import Any

# run_glue.py SparseArguments: sparse_lambda 1e-3, sparse_lambda_2 1e-3; lambda_schedule None (here "").
REFERENCE_FIELDS: dict[str, Any] = {
    "sparse_lambda": 1e-3, "sparse_lambda_2": 1e-3, "sparse_lr": 0.0, "lambda_schedule": "", "max_lambda": 10.0,
    "lambda_num": 10, "stage_steps": 0,
}

# Per task, the adapter.sora.* values of the published scripts (the rest: REFERENCE_FIELDS).
GLUE_FIELDS: dict[str, dict[str, Any]] = {
    "stsb": {"sparse_lambda": 10.0, "sparse_lambda_2": 3e-4},  # run_glue_sora_no_schedule.sh
    "rte": {"sparse_lambda": 1e-3, "sparse_lambda_2": 0.0},  # run_glue_sora_schedule_dense.sh, main run
}

# The scripts' shared settings (documented overrides for the reference's own full run; glue_config keeps the
# preset's like-for-like shared settings).
PUBLISHED_RUNS: dict[str, dict[str, Any]] = {
    "stsb": {"adapter.r_max": 8, "adapter.alpha": 16.0, "optim.learning_rate": 8e-4, "train.num_epochs": 20,
             "train.batch_size": 8, "optim.grad_clip": 0.1, "optim.weight_decay": 0.1,
             "optim.adapter_weight_decay": 0.1, "data.max_length": 128, "warmup_ratio": 0.06},
    "rte": {"adapter.r_max": 8, "adapter.alpha": 16.0, "optim.learning_rate": 1.2e-3, "train.num_epochs": 50,
            "train.batch_size": 32, "optim.grad_clip": 0.1, "optim.weight_decay": 0.1,
            "optim.adapter_weight_decay": 0.1, "data.max_length": 320, "warmup_ratio": 0.06,
            "adapter.sora.lambda_schedule": "linear", "adapter.sora.max_lambda": 7e-4, "adapter.sora.lambda_num": 7},
}

TABLE3_BUDGET: dict[str, Any] = {"adapter.r_max": 4, "adapter.sora.sparse_lambda": 10.0,
                                 "adapter.sora.sparse_lambda_2": 3e-4}


def glue_sora_fields(task: str) -> dict[str, Any]:
    """``adapter.sora.*`` for GLUE ``task``: the published script's values, else ``run_glue.py``'s defaults."""
    return {**REFERENCE_FIELDS, **GLUE_FIELDS.get(task, {})}
