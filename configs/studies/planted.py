"""Planted-rank benchmark: AdaPaD against joint, fixed-rank LoRA and its own ablations where allocation matters.

    python launch/planted.py --config configs/studies/planted.py --config.results_doc=docs/RESULTS.md
    python launch/planted.py --config configs/studies/planted.py --config.quick=True --config.output_dir=/tmp/planted

Tasks (adapad_jax/studies/planted.py): the toy model with a teacher that adds a rank-r delta to a few
modules and nothing elsewhere; regression on the teacher's outputs for fresh random token sequences.
- branches: 8 adapted 16x16 modules, each on its own branch from the pooled input to its own outputs, so a
  delta planted in one module can only be learnt there. Planted ranks 4, 3, 2 in modules 1, 4, 6.
- residual: 4 residual MLP blocks (fc_in 16->32, fc_out 32->16), the same planted ranks; here any module's
  output reaches the head through later blocks, so other modules can partly stand in for a planted one.
Budget 16 = 8 modules x 2 (fixed-rank LoRA r = 2 at the same total rank, which cannot represent the rank-4 and
rank-3 deltas), r_max 4, one promotion every 20 steps (the budget is spent by step 180).
Each run trains until the held-out error stops moving (stop.*: after the budget is spent, the best of the last
`patience` = 8 evaluations, 200 steps, is within `tolerance` = 1% of the best before, or below `floor`), at most
stop.max_steps = 2000.
Writes output_dir/results.json, summary.md, and runs/<task>/<variant>/seed<k>/{ranks.json,planted.json}.
Diagnostics (a second table): the head frozen (it is the teacher's already, so it need not move), the branches
task without its gelu (linear_branches: the model is linear in each delta), and the right allocation given
instead of found (oracle_ranks: every module at its planted rank, clipped to [1, r_max]; no growth), and
AdaPaD at learning rates 3e-3 and 3e-2 (the table's runs use 1e-2). More diagnostics (joint_fixed_rank,
adapad_fixed_rank_alpha8, adapad_T100, joint_T100) run with --config.variants= --config.diagnostics=task:variant,...
(the commands are in docs/RESULTS.md).
The comparison methods (adalora, increlora, sora, ardlora: studies/planted.method_overrides fits their schedules
to these runs) run with --config.variants=adalora,increlora,sora,ardlora; --config.results_doc merges their rows
into the tables there, each row naming its run's command.
`quick` shrinks everything (1 task, 2 seeds, 4 modules, <= 60 steps) for the test.
"""

import ml_collections

from adapad_jax.studies.planted import STUDY_ADAPTER, STUDY_OPTIM

VARIANTS = "adapad,joint,lora,adapad_uniform,adapad_no_advance,adapad_fixed_rank"
DIAGNOSTICS = ",".join([
    "branches:adapad_lr_3e-3", "branches:adapad_lr_3e-2",
    "branches:adapad_frozen_head", "branches:joint_frozen_head", "branches:adapad_oracle_ranks",
    "linear_branches:adapad_frozen_head", "linear_branches:joint_frozen_head",
    "residual:adapad_oracle_ranks", "residual:joint_oracle_ranks",
])


def _task(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
    """Default configuration of launch/planted.py."""
    config = ml_collections.ConfigDict()
    config.output_dir = "runs/planted"
    config.results_doc = ""  # e.g. docs/RESULTS.md: its planted-benchmark section is replaced by the new table
    config.quick = False
    config.seed = 0
    config.seeds = 3
    config.tasks = "branches,residual"
    config.variants = VARIANTS
    # task:variant pairs run after the main table, to explain it (studies/planted.DIAGNOSTICS); same seeds.
    config.diagnostics = DIAGNOSTICS
    config.task_settings = ml_collections.ConfigDict({
        "branches": _task(layout="branches", planted="0,4,0,0,3,0,2,0", hidden=16, num_layers=4, scale=1.0,
                          batch_size=64, seq_len=8, eval_rows=512),
        "linear_branches": _task(layout="linear_branches", planted="0,4,0,0,3,0,2,0", hidden=16, num_layers=4,
                                 scale=1.0, batch_size=64, seq_len=8, eval_rows=512),
        "residual": _task(layout="residual", planted="0,4,0,0,3,0,2,0", hidden=16, num_layers=4, scale=1.0,
                          batch_size=64, seq_len=8, eval_rows=512),
    })
    config.adapter = ml_collections.ConfigDict(dict(STUDY_ADAPTER))
    config.optim = ml_collections.ConfigDict(dict(STUDY_OPTIM))
    config.stop = ml_collections.ConfigDict(dict(
        eval_every=25, patience=8, tolerance=0.01, floor=1e-4, min_steps=100, max_steps=2000,
    ))
    return config
