"""IncreLoRA (Zhang et al. 2023a), written from ``FeiyuZhang98/IncreLoRA``: its rules and the method on the seam.

The rules first (``tests/test_increlora_rules.py`` checks each against a NumPy oracle written from the reference
files), then ``IncreLoRA``, the method on the seam (``methods/base.py``) that the trainer runs with them
(``tests/test_increlora_method.py``). docs/methods/increlora.md lists what is faithful and every deliberate
difference of the trainer's method (growth on the host after the optimiser step, which changes no number; the
shared per-row Adam count of a promoted E; lr restarts as multipliers on the shared schedule; eval and export
of the committed rows only, without the reserves' E = 1e-5 terms the reference's eval weight keeps until the
budget zeroes them).

Sources: ``loralib/loralib/increlora.py`` (``SVDLinear``, ``RankAllocator``), ``NLU/src/transformers/trainer.py``
(call order, ``compute_svd_orth_regu``), ``NLU/src/transformers/optimization.py`` (``Multi_LambdaLR``),
``NLU/examples/text-classification/run_glue.py`` (argument defaults), ``NLU/scripts/rank=2/run_*.sh`` (GLUE).

Layout (the project's slot-leading one): per module m, ``e`` [R] (the reference's ``lora_E`` list, one entry per
component), ``a`` [R, in] (``lora_A`` rows) and ``b`` [R, out] (``lora_B`` columns, transposed). R is a fixed slot
capacity; the reference's ragged ``ParameterList`` is slots ``[0, allocated_m)``: ``ranknum_m`` committed components
followed by ``incre_rank_num`` reserves. Slots past ``allocated_m`` are unused and carry e = 0.

Reference defaults (``REFERENCE_DEFAULTS``; ``run_glue.py`` arguments unless said): ``target_rank`` 16,
``target_total_rank`` none (= target_rank x modules), ``init_warmup`` 4500, ``incre_interval`` 10, ``top_h`` 10,
``beta1`` = ``beta2`` = 0.85, ``advance_learn`` True, ``multi_lr`` True, ``incre_rank_num`` none (then
{2: 1, 4: 2, 6: 3, 8: 4}[target_rank], ``RankAllocator.__init__``), ``reg_orth_coef`` 0.0, ``lora_dropout`` 0.0,
``lora_r`` / ``lora_alpha`` none (every script sets them), ``warmup_steps`` (the lr warm-up of every group; the GLUE
scripts set it to ``incre_interval``), AdamW with ``weight_decay`` on every group, ``max_grad_norm`` 1.0. Init (``SVDLinear.reset_parameters``): first component
E = 0 (trainable), A and B ~ N(0, 0.02); reserves (``add_reserve_param``): E = 1e-5 frozen with A, B ~ N(0, 0.02)
trainable when ``advance_learn``, else E = 0 and A, B frozen. The GLUE scripts' values are ``GLUE_SETTINGS``.

Rules, as the reference has them:

- scale: ``lora_alpha / (ranknum + 1e-5)`` (``loraW.forward``; ``r`` stands in for alpha <= 0), ranknum = the
  module's committed count, which grows; ΔW = Σ_j E_j b_j a_j^T * scale over every allocated slot (reserves too).
- importance (``SVDLinear.backward_hook``): sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(numel ΔW) on the whole product; EMAs
  Ī ← β1 Ī + (1 - β1) I, then Ū ← β2 Ū + (1 - β2) |I - Ī| against the *new* Ī (``update_ipt``); score Ī·Ū.
  They are updated every step (step 0 and warm-up included) while total < target, then never again.
- growth (``update_and_increase`` / ``increase_to_target_rank``): at step 0 every module gets its reserves; when
  step > init_warmup and step % incre_interval == 0 (total < target), k = min(top_h, target - total) and every
  module whose score is ``>=`` the k-th largest grows (ties can grow more than k, and the total can overshoot):
  ranknum += incre_rank_num, its reserves' E join the optimiser (from their value, 1e-5), new reserves are
  appended. No per-module cap. When total == target exactly, scoring stops and every module's last
  ``incre_rank_num`` E (its reserves) is set to 0; after an overshoot neither happens (the EMAs still stop).
- learning rate (``Multi_LambdaLR``): every parameter group added at step s0 gets its own linear warm-up/decay,
  multiplier at optimiser step t: c = t - s0 - 1, T' = T - s0 - 1, c / max(1, w) while c < w, else
  max(0, (T' - c) / max(1, T' - w)). The optimiser's own groups are s0 = -1. At t = s0 the new group runs at the
  optimiser's default lr (multiplier 1), but none of its parameters has a gradient then (they were frozen or
  created after the backward pass), so nothing moves. A component's A, B sit in the group of the step it became a
  reserve, its E in the group of the step it was promoted.
- orthogonal regulariser (``Trainer.compute_svd_orth_regu``): ||A A^T - I||_F + ||B^T B - I||_F on each module's
  concatenated factors (reserves included), averaged over the 2M matrices; ``methods.orthogonality.orthogonality_penalty``
  with the allocated slots as its row mask, reused here, not written twice.
- call order (``Trainer.train``): backward (the hook scores), gradient clipping, ``update_and_increase``,
  ``optimizer.step``, ``lr_scheduler.step``.

Deliberate differences:

- Fixed slot capacity R instead of growing lists: ``allocate`` refuses, with one line, a growth that would need a
  slot past R (``slots_needed`` gives a capacity that always suffices).
- ``incre_rank_num_for`` raises one clear line for a target_rank outside {2, 4, 6, 8} with no incre_rank_num
  (the reference raises KeyError; ``run_glue.py``'s own default target_rank 16 hits it).
- Host-side NumPy for the schedule (``allocate``, ``select_growth``, ``group_lr_multiplier``); the array rules
  (``module_scale``, ``delta_weight``, ``module_score``, ``update_importance``, ``orthogonal_regulariser``) jit.
- ``slot_lr_multipliers`` returns 0 where the reference has no gradient (frozen, or a group's creation step).
- Not here: the tensorboard logging, gradient accumulation (the reference's hook keeps the last micro-batch's
  score), DeepSpeed, the ``frd`` LoRA type, ``advance_learn=False`` beyond its E / A / B freezing, export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.methods.allocator import rank_capacity
from adapad_jax.methods.orthogonality import orthogonality_penalty
from adapad_jax.methods.base import Method, MethodSetup, Tree

Params = dict[str, list[jax.Array]]
Importance = dict[str, jax.Array]

RANKNUM_EPS = 1e-5
RESERVE_LAMBDA = 1e-5
INIT_STD = 0.02
INITIAL_GROUP = -1  # the optimiser's own parameter groups (created before step 0)
FROZEN = -2  # not in any optimiser group
EMA_KEYS = ("ipt", "exp_avg_ipt", "exp_avg_unc")
INCRE_RANK_NUM = {2: 1, 4: 2, 6: 3, 8: 4}

REFERENCE_DEFAULTS: dict[str, Any] = {
    "target_rank": 16,
    "target_total_rank": None,
    "init_warmup": 4500,
    "incre_interval": 10,
    "top_h": 10,
    "beta1": 0.85,
    "beta2": 0.85,
    "advance_learn": True,
    "multi_lr": True,
    "incre_rank_num": None,
    "reg_orth_coef": 0.0,
    "lora_dropout": 0.0,
    "lora_r": None,
    "lora_alpha": None,
}

# Per-task GLUE settings of the IncreLoRA repository, each value's script cited (config layer: presets read it).
from adapad_jax.config.increlora_presets import GLUE_LORA_R, GLUE_SETTINGS, GLUE_TARGET_RANK  # noqa: E402,F401


def incre_rank_num_for(target_rank: int, incre_rank_num: int | None = None) -> int:
    """Ranks added per promotion: the given number, else the reference's table for target_rank 2/4/6/8."""
    if incre_rank_num:
        return incre_rank_num
    if target_rank not in INCRE_RANK_NUM:
        raise ValueError(f"increlora: no incre_rank_num given and target_rank {target_rank} is not one of "
                         f"{sorted(INCRE_RANK_NUM)}; pass incre_rank_num")
    return INCRE_RANK_NUM[target_rank]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """IncreLoRA's static growth settings."""

    target_total: int
    init_warmup: int
    incre_interval: int
    top_h: int
    incre_rank_num: int = 1
    beta1: float = REFERENCE_DEFAULTS["beta1"]
    beta2: float = REFERENCE_DEFAULTS["beta2"]
    advance_learn: bool = REFERENCE_DEFAULTS["advance_learn"]
    max_rank: int = 0  # the per-module cap (adapter.r_max): a module at it is not eligible; 0 = none, the reference

    def __post_init__(self):
        if self.incre_interval < 1 or self.top_h < 1 or self.incre_rank_num < 1:
            raise ValueError(f"increlora: incre_interval, top_h and incre_rank_num must be >= 1, got "
                             f"{self.incre_interval}, {self.top_h}, {self.incre_rank_num}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"increlora: beta1 and beta2 must lie in (0, 1), got {self.beta1}, {self.beta2}")


@dataclasses.dataclass(frozen=True)
class State:
    """Host-side growth state: per module counts and, per slot, the step whose optimiser group holds it."""

    ranknum: np.ndarray  # [M] committed components (the scale's r_m)
    allocated: np.ndarray  # [M] slots in use: committed + reserves
    e_group: np.ndarray  # [M, R] creation step of the group holding E_j; INITIAL_GROUP or FROZEN
    ab_group: np.ndarray  # [M, R] the same for a_j, b_j
    total_rank: int
    scoring: bool  # total < target: scores are still read and the EMAs updated
    importance: Importance


def slots_needed(lora_r: int, target_total: int, num_modules: int, incre_rank_num: int) -> int:
    """A slot capacity R no growth sequence can exceed (one module taking every round, plus its reserve)."""
    return lora_r + max(target_total - lora_r * num_modules, 0) + 2 * incre_rank_num


def init_state(num_modules: int, slots: int, lora_r: int) -> State:
    """State before step 0: ``lora_r`` committed components per module in the optimiser's groups, no reserves."""
    if lora_r < 1 or slots < lora_r:
        raise ValueError(f"increlora: need 1 <= lora_r <= slots, got lora_r={lora_r}, slots={slots}")
    groups = np.full((num_modules, slots), FROZEN, np.int64)
    groups[:, :lora_r] = INITIAL_GROUP
    return State(ranknum=np.full(num_modules, lora_r, np.int64), allocated=np.full(num_modules, lora_r, np.int64),
                 e_group=groups.copy(), ab_group=groups.copy(), total_rank=lora_r * num_modules, scoring=True,
                 importance={key: jnp.zeros(num_modules, jnp.float32) for key in EMA_KEYS})


def init_lambda(num_modules: int, slots: int) -> list[jax.Array]:
    """Every E starts at 0 (the first component's trainable 0; unused slots stay 0 until allocated)."""
    return [jnp.zeros(slots, jnp.float32) for _ in range(num_modules)]


def module_scale(lora_alpha: float, ranknum: Any, lora_r: int) -> Any:
    """The forward scale alpha / (ranknum + 1e-5) (``loraW``); ``lora_r`` stands in for alpha <= 0."""
    return (lora_alpha if lora_alpha > 0 else float(lora_r)) / (ranknum + RANKNUM_EPS)


def delta_weight(e: jax.Array, a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
    """ΔW [out, in] = Σ_j e_j b_j a_j^T * scale over the slots (``loraW.forward``)."""
    return jnp.einsum("ro,r,ri->oi", b, e, a) * scale


def module_score(delta: jax.Array, grad: jax.Array) -> jax.Array:
    """sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(numel) (``SVDLinear.backward_hook``)."""
    return jnp.sum(jnp.abs(delta * grad)) / math.sqrt(delta.size)


def update_importance(importance: Importance, scores: jax.Array, *, beta1: float = REFERENCE_DEFAULTS["beta1"],
                      beta2: float = REFERENCE_DEFAULTS["beta2"]) -> Importance:
    """One step of the per-module EMAs (``RankAllocator.update_ipt``): Ū is taken against the new Ī."""
    sensitivity = beta1 * importance["exp_avg_ipt"] + (1 - beta1) * scores
    uncertainty = beta2 * importance["exp_avg_unc"] + (1 - beta2) * jnp.abs(scores - sensitivity)
    return {"ipt": scores, "exp_avg_ipt": sensitivity, "exp_avg_unc": uncertainty}


def importance_score(importance: Importance) -> jax.Array:
    """Per module Ī·Ū (``calculate_score`` with metric "ipt")."""
    return importance["exp_avg_ipt"] * importance["exp_avg_unc"]


def growth_due(step: int, schedule: Schedule) -> bool:
    """Whether ``step`` is a growth step (before the total < target check)."""
    return step > schedule.init_warmup and step % schedule.incre_interval == 0


def select_growth(scores: np.ndarray, total_rank: int, target_total: int, top_h: int,
                  eligible: np.ndarray | None = None) -> np.ndarray:
    """[M] bool: modules scoring ``>=`` the k-th largest, k = min(top_h, target - total) (``torch.topk``).

    ``eligible`` ([M] bool, ours): only these modules compete (those below the cap); k shrinks to their number.
    """
    scores = np.asarray(scores, np.float32)
    k = min(top_h, target_total - total_rank)
    if eligible is not None:
        eligible = np.asarray(eligible, bool)
        scores = np.where(eligible, scores, -np.inf)
        k = min(k, int(eligible.sum()))
        if k <= 0:
            return np.zeros(scores.shape, bool)
    threshold = np.sort(scores)[::-1][k - 1]
    return scores >= threshold


def _add_reserves(e: list[jax.Array], state: dict[str, Any], m: int, step: int, schedule: Schedule) -> None:
    """Append ``incre_rank_num`` reserves to module m (``add_reserve_param``), in place on the unfrozen copies."""
    start, stop = int(state["allocated"][m]), int(state["allocated"][m]) + schedule.incre_rank_num
    if stop > state["e_group"].shape[1]:
        raise ValueError(f"increlora: module {m} needs {stop} slots but has {state['e_group'].shape[1]}; "
                         f"size the slots with slots_needed()")
    e[m] = e[m].at[start:stop].set(RESERVE_LAMBDA if schedule.advance_learn else 0.0)
    state["ab_group"][m, start:stop] = step if schedule.advance_learn else FROZEN
    state["e_group"][m, start:stop] = FROZEN
    state["allocated"][m] = stop


def _promote(state: dict[str, Any], m: int, step: int, schedule: Schedule) -> None:
    """Commit module m's reserves: their E (and, without advance learning, A and B) join a new group."""
    stop = int(state["allocated"][m])
    start = stop - schedule.incre_rank_num
    state["e_group"][m, start:stop] = step
    if not schedule.advance_learn:
        state["ab_group"][m, start:stop] = step
    state["ranknum"][m] += schedule.incre_rank_num
    state["total_rank"] += schedule.incre_rank_num


def score_step(state: State, scores: jax.Array | None, schedule: Schedule) -> State:
    """The EMAs after one step's per-module ``module_score`` values while total < target (``update_ipt``)."""
    if state.total_rank >= schedule.target_total:
        return state
    if scores is None:
        raise ValueError("increlora: still scoring but no module scores were given")
    importance = update_importance(state.importance, jnp.asarray(scores, jnp.float32),
                                   beta1=schedule.beta1, beta2=schedule.beta2)
    return dataclasses.replace(state, importance=importance)


def grow(state: State, e: Sequence[jax.Array], step: int, schedule: Schedule
         ) -> tuple[list[jax.Array], State, np.ndarray | None]:
    """``update_and_increase`` after its ``update_ipt``: the step-0 reserves, then on a growth step the top-h
    promotion with new reserves and, at the budget, the reserves' E set to 0. New ``e``, state, grown (or None)."""
    e = list(e)
    work = {"ranknum": state.ranknum.copy(), "allocated": state.allocated.copy(), "e_group": state.e_group.copy(),
            "ab_group": state.ab_group.copy(), "total_rank": state.total_rank}
    if step == 0:
        for m in range(len(e)):
            _add_reserves(e, work, m, step, schedule)
    scoring, grown = state.scoring, None
    if state.total_rank < schedule.target_total:
        if growth_due(step, schedule):
            eligible = (state.ranknum + schedule.incre_rank_num <= schedule.max_rank) if schedule.max_rank else None
            grown = select_growth(np.asarray(importance_score(state.importance)), state.total_rank,
                                  schedule.target_total, schedule.top_h, eligible)
            for m in np.flatnonzero(grown):
                _promote(work, int(m), step, schedule)
                _add_reserves(e, work, int(m), step, schedule)
            if work["total_rank"] == schedule.target_total:
                for m in range(len(e)):
                    stop = int(work["allocated"][m])
                    e[m] = e[m].at[stop - schedule.incre_rank_num:stop].set(0.0)
        scoring = work["total_rank"] < schedule.target_total
    return e, State(importance=state.importance, scoring=scoring, **work), grown


def allocate(state: State, e: Sequence[jax.Array], scores: jax.Array | None, step: int, schedule: Schedule
             ) -> tuple[list[jax.Array], State, np.ndarray | None]:
    """New ``e``, state and grown modules (or None) after ``step`` (``update_and_increase``, before the optimiser).

    ``scores`` are this step's per-module ``module_score`` values; they are read only while scoring.
    """
    return grow(score_step(state, scores, schedule), e, step, schedule)


def trainable_masks(state: State) -> tuple[np.ndarray, np.ndarray]:
    """[M, R] bool masks of the E and of the A / B slots that are in an optimiser group."""
    return state.e_group != FROZEN, state.ab_group != FROZEN


def group_lr_multiplier(step: int, created_at: int, warmup: int, total_steps: int) -> float:
    """lr multiplier at optimiser step ``step`` of a group added at ``created_at`` (``Multi_LambdaLR``)."""
    if created_at != INITIAL_GROUP and step == created_at:
        return 1.0  # the optimiser's default lr; none of the group's parameters has a gradient at this step
    count, horizon = step - created_at - 1, total_steps - created_at - 1
    if count < warmup:
        return float(count) / float(max(1, warmup))
    return max(0.0, float(horizon - count) / float(max(1, horizon - warmup)))


def slot_lr_multipliers(state: State, step: int, warmup: int, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """[M, R] multipliers for E and for A / B at ``step``; 0 where the reference has no gradient."""
    def table(groups: np.ndarray) -> np.ndarray:
        out = np.zeros(groups.shape, np.float64)
        for created in np.unique(groups):
            if created == FROZEN or created == step:
                continue
            out[groups == created] = group_lr_multiplier(step, int(created), warmup, total_steps)
        return out
    return table(state.e_group), table(state.ab_group)


def allocated_mask(state: State, slots: int) -> jax.Array:
    """[M, R] bool: the slots in use (committed and reserves)."""
    return jnp.arange(slots)[None, :] < jnp.asarray(state.allocated)[:, None]


def orthogonal_regulariser(params: Params, allocated: jax.Array) -> jax.Array:
    """``compute_svd_orth_regu`` (unweighted) over each module's allocated slots, reserves included."""
    return orthogonality_penalty({"a": params["a"], "b": params["b"]}, allocated)


def group_multiplier_jnp(step: jax.Array, created: jax.Array, warmup: int, total_steps: int) -> jax.Array:
    """``group_lr_multiplier`` element-wise on arrays (jit), 0 where the group is FROZEN or created at ``step``
    (``slot_lr_multipliers``' convention: nothing of the group has a gradient then)."""
    step = jnp.asarray(step, jnp.float32)
    created_f = created.astype(jnp.float32)
    count, horizon = step - created_f - 1.0, float(total_steps) - created_f - 1.0
    warm = count / float(max(1, warmup))
    decay = jnp.maximum(0.0, (horizon - count) / jnp.maximum(1.0, horizon - float(warmup)))
    value = jnp.where(count < warmup, warm, decay)
    return jnp.where((created == FROZEN) | (created_f == step), 0.0, value)


class IncreLoRA(Method):
    """``adapter.method=increlora`` on the method seam (``methods/base.py``), driving the rules above.

    Train state: ``slots`` = ``{"a" [R, in], "b" [R, out], "e" [R, 1]}`` per module; ``alloc["rank"]`` = ranknum
    (committed components), ``alloc["committed"]`` rows < ranknum, ``alloc["reserve"]`` rows [ranknum, allocated),
    ``alloc["imp_ema"]`` / ``["unc_ema"]`` = Ī / Ū; ``state["method"]`` = ``allocated`` [M], ``e_group`` /
    ``ab_group`` [M, R] (the step whose optimiser group holds the row: ``INITIAL_GROUP`` or ``FROZEN``),
    ``scoring`` (total < target), ``ipt`` [M] (the last score). Everything a rule reads is in the state tree.
    """

    name = "increlora"
    weight_gradients = True

    # ------------------------------------------------------------------ setup
    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        from adapad_jax.config.validation import check_initial_rank, check_rank_budget
        from adapad_jax.runtime.failures import ConfigError

        cfg = self.config
        lora_r, target = int(settings.initial_rank), int(settings.rank_budget)
        check_initial_rank(lora_r, int(settings.r_max))
        check_rank_budget(target, num_modules, lora_r)
        # As for every method, the target is the reachable budget min(rank_budget, modules x r_max).
        target = rank_capacity(target, num_modules, int(settings.r_max))
        if int(settings.growth_interval) < 1 or int(settings.top_k) < 1:
            raise ConfigError(f"adapter.method=increlora needs adapter.growth_interval >= 1 (incre_interval) and "
                              f"adapter.top_k >= 1 (top_h), got {settings.growth_interval} and {settings.top_k}")
        incre = int(cfg.get("incre_rank_num", 0) or 0)
        if not incre:
            average = target // num_modules if target % num_modules == 0 else None
            if average not in INCRE_RANK_NUM:
                raise ConfigError(f"adapter.increlora.incre_rank_num=0 takes the reference's table by average target "
                                  f"rank {sorted(INCRE_RANK_NUM)}, but adapter.rank_budget={target} over "
                                  f"{num_modules} modules is not one of them; set adapter.increlora.incre_rank_num")
            incre = INCRE_RANK_NUM[average]
        if bool(cfg.get("multi_lr", True)) and settings.optim.schedule != "linear":
            raise ConfigError(f"adapter.increlora.multi_lr restarts the linear warm-up/decay per component "
                              f"(Multi_LambdaLR), but optim.schedule='{settings.optim.schedule}'; set "
                              "optim.schedule=linear or adapter.increlora.multi_lr=False")
        warmup = int(cfg.get("init_warmup", 0) or 0) or int(settings.growth_interval)
        advance = bool(cfg.get("advance_learn", True))
        self.schedule = Schedule(target_total=target, init_warmup=warmup, incre_interval=int(settings.growth_interval),
                                 top_h=int(settings.top_k), incre_rank_num=incre,
                                 beta1=float(cfg.get("beta1", REFERENCE_DEFAULTS["beta1"])),
                                 beta2=float(cfg.get("beta2", REFERENCE_DEFAULTS["beta2"])), advance_learn=advance,
                                 max_rank=int(settings.r_max))
        self.alpha = float(settings.alpha)
        # Rows: the cap plus one promotion's reserves (fewer when the budget cannot take a module that far).
        slots = min(slots_needed(lora_r, target, num_modules, incre), int(settings.r_max) + incre)
        # The export's scale s (B carries e / (ranknum + 1e-5)): lora_alpha, or lora_r for alpha <= 0 (SVDLinear).
        scaling = self.alpha if self.alpha > 0 else float(lora_r)
        return MethodSetup(num_modules, slots, scaling, lora_r, target, True, advance)

    # ------------------------------------------------------------------ state
    def init_slots(self, key: jax.Array) -> Tree:
        slots = super().init_slots(key)
        slots["e"] = [jnp.zeros((self.num_slots, 1), jnp.float32) for _ in self.targets]  # reset_parameters: E = 0
        return slots

    def init_alloc(self) -> Tree:
        return self._alloc_of(init_state(self.setup.num_modules, self.num_slots, self.setup.initial_rank), -1)

    def init_method_state(self, trainable: Tree) -> Tree:
        state = init_state(self.setup.num_modules, self.num_slots, self.setup.initial_rank)
        return self._method_state_of(state)

    def _alloc_of(self, state: State, spent_step: int) -> Tree:
        rows = np.arange(self.num_slots)[None, :]
        ranknum = state.ranknum[:, None]
        return {
            "committed": jnp.asarray(rows < ranknum),
            "reserve": jnp.asarray((rows >= ranknum) & (rows < state.allocated[:, None])),
            "rank": jnp.asarray(state.ranknum, jnp.int32),
            "imp_ema": jnp.asarray(state.importance["exp_avg_ipt"], jnp.float32),
            "unc_ema": jnp.asarray(state.importance["exp_avg_unc"], jnp.float32),
            "budget_left": jnp.asarray(max(self.schedule.target_total - state.total_rank, 0), jnp.int32),
            "budget_spent_step": jnp.asarray(0 if state.total_rank >= self.schedule.target_total and spent_step < 0
                                             else spent_step, jnp.int32),
        }

    @staticmethod
    def _method_state_of(state: State) -> Tree:
        return {
            "allocated": jnp.asarray(state.allocated, jnp.int32),
            "e_group": jnp.asarray(state.e_group, jnp.int32),
            "ab_group": jnp.asarray(state.ab_group, jnp.int32),
            "scoring": jnp.asarray(state.scoring, bool),
            "ipt": jnp.asarray(state.importance["ipt"], jnp.float32),
        }

    def rules_state(self, alloc: Tree, method_state: Tree) -> State:
        """The rules module's host-side ``State`` of a train state's ``alloc`` and ``method``."""
        ranknum = np.asarray(alloc["rank"]).astype(np.int64)
        return State(ranknum=ranknum, allocated=np.asarray(method_state["allocated"]).astype(np.int64),
                     e_group=np.asarray(method_state["e_group"]).astype(np.int64),
                     ab_group=np.asarray(method_state["ab_group"]).astype(np.int64),
                     total_rank=int(ranknum.sum()), scoring=bool(np.asarray(method_state["scoring"])),
                     importance={"ipt": jnp.asarray(method_state["ipt"]),
                                 "exp_avg_ipt": jnp.asarray(alloc["imp_ema"]),
                                 "exp_avg_unc": jnp.asarray(alloc["unc_ema"])})

    # ---------------------------------------------------------------- forward
    def _allocated(self, method_state: Tree) -> jax.Array:
        return jnp.arange(self.num_slots)[None, :] < method_state["allocated"][:, None]

    def module_scales(self, alloc: Tree) -> jax.Array:
        """[M] alpha / (ranknum + 1e-5) (``loraW``), recomputed as ranknum grows."""
        return module_scale(self.alpha, alloc["rank"].astype(jnp.float32), self.setup.initial_rank)

    def forward_coefs(self, trainable: Tree, alloc: Tree, method_state: Tree, train: bool) -> jax.Array:
        """e_j * alpha / (ranknum + 1e-5): in training on every allocated row, reserves included (their e is
        1e-5, or 0 after the budget); evaluated and exported, the committed rows only (docs/methods/increlora.md:
        the reference's eval weight also has the reserves' 1e-5 terms until the budget zeroes them)."""
        e = jnp.stack([x[:, 0] for x in trainable["slots"]["e"]])
        rows = self._allocated(method_state) if train else alloc["committed"]
        return (e * self.module_scales(alloc)[:, None] * rows).astype(jnp.float32)

    def live_mask(self, alloc: Tree, method_state: Tree) -> jax.Array:
        """Rows in an optimiser group: committed rows, and reserves' a, b with advance learning."""
        return (method_state["ab_group"] != FROZEN) | (method_state["e_group"] != FROZEN)

    # ----------------------------------------------------------- loss, update
    def penalty_and_scores(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree
                           ) -> tuple[Tree, jax.Array, jax.Array]:
        """Frozen E (reserves) and frozen a, b get no gradient; ``reg_orth_coef`` x the orthogonal regulariser over
        the allocated rows; the per-module score sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(numel) on the whole product."""
        slots = trainable["slots"]
        allocated = self._allocated(method_state)
        e_on = (method_state["e_group"] != FROZEN).astype(jnp.float32)
        ab_on = (method_state["ab_group"] != FROZEN).astype(jnp.float32)
        coef = float(self.config.get("reg_orth_coef", REFERENCE_DEFAULTS["reg_orth_coef"]))
        ab = {"a": slots["a"], "b": slots["b"]}
        if coef > 0:
            penalty, penalty_grads = jax.value_and_grad(lambda s: coef * orthogonal_regulariser(s, allocated))(ab)
        else:
            penalty, penalty_grads = jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, ab)
        new_slots = dict(grads["slots"])
        for part in ("a", "b"):
            new_slots[part] = [(g + p) * ab_on[m][:, None]
                               for m, (g, p) in enumerate(zip(grads["slots"][part], penalty_grads[part]))]
        new_slots["e"] = [g * e_on[m][:, None] for m, g in enumerate(grads["slots"]["e"])]
        scales = self.module_scales(alloc)
        scores = []
        for m in range(len(self.targets)):
            e = slots["e"][m][:, 0] * allocated[m]
            delta = delta_weight(e, slots["a"][m], slots["b"][m], scales[m])  # [out, in]
            scores.append(module_score(delta.T, grads["weights"][m]))  # the kernel's [in, out] layout
        return {**grads, "slots": new_slots}, penalty, jax.lax.stop_gradient(jnp.stack(scores))

    def lr_multipliers(self, step: jax.Array, lr: jax.Array, method_state: Tree) -> tuple[jax.Array, jax.Array]:
        """[M, R] multipliers of the E and of the a, b updates at 0-based ``step`` relative to the shared lr:
        1 in the optimiser's own groups, the restarted warm-up of a later group (``Multi_LambdaLR``) divided by
        the shared schedule's value, 0 where frozen or at a group's creation step (0 too where lr = 0)."""
        e_group, ab_group = method_state["e_group"], method_state["ab_group"]
        if not bool(self.config.get("multi_lr", True)):
            return (e_group != FROZEN).astype(jnp.float32), (ab_group != FROZEN).astype(jnp.float32)
        optim = self.settings.optim
        warmup = min(max(int(optim.warmup_steps), 0), self.total_steps)
        peak = float(optim.learning_rate)
        ratio = jnp.where(lr > 0, peak / jnp.where(lr > 0, lr, 1.0), 0.0)

        def table(groups):
            later = group_multiplier_jnp(step, groups, warmup, self.total_steps) * ratio
            return jnp.where(groups == INITIAL_GROUP, 1.0, later).astype(jnp.float32)

        return table(e_group), table(ab_group)

    def scale_updates(self, updates: Tree, step: jax.Array, lr: jax.Array, method_state: Tree) -> Tree:
        e_mult, ab_mult = self.lr_multipliers(step, lr, method_state)
        slots = {part: [u * (e_mult if part == "e" else ab_mult)[m][:, None].astype(u.dtype)
                        for m, u in enumerate(rows)] for part, rows in updates["slots"].items()}
        return {**updates, "slots": slots}

    def after_update(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree, scores: Any,
                     step: jax.Array, key: jax.Array) -> tuple[Tree, Tree, Tree, jax.Array]:
        """``update_ipt`` on this step's scores while total < target (the jitted half of ``update_and_increase``)."""
        old = {"ipt": method_state["ipt"], "exp_avg_ipt": alloc["imp_ema"], "exp_avg_unc": alloc["unc_ema"]}
        new = update_importance(old, scores, beta1=self.schedule.beta1, beta2=self.schedule.beta2)
        on = method_state["scoring"]
        pick = {k: jnp.where(on, new[k], old[k]).astype(jnp.float32) for k in EMA_KEYS}
        alloc = {**alloc, "imp_ema": pick["exp_avg_ipt"], "unc_ema": pick["exp_avg_unc"]}
        return trainable, alloc, {**method_state, "ipt": pick["ipt"]}, jnp.zeros((), bool)

    def host_update_due(self, step: int) -> bool:
        """After reference step g = ``step`` - 1: g = 0 (the first reserves) or a growth step (g > init_warmup,
        g % incre_interval == 0)."""
        return step == 1 or growth_due(step - 1, self.schedule)

    def host_update(self, state: Tree, step: int) -> Tree | None:
        """``grow`` (reserves at g = 0, promotions, new reserves, E = 0 at the budget) after reference step
        g = ``step`` - 1, whose optimiser step never touches what changes here (see docs/methods/increlora.md)."""
        host = jax.device_get({"alloc": state["alloc"], "method": state["method"],
                               "e": state["trainable"]["slots"]["e"]})
        rules = self.rules_state(host["alloc"], host["method"])
        e = [jnp.asarray(x[:, 0]) for x in host["e"]]
        new_e, new_rules, grown = grow(rules, e, step - 1, self.schedule)
        if step - 1 != 0 and grown is None and new_rules.scoring == rules.scoring:
            return None
        spent = int(host["alloc"]["budget_spent_step"])
        if spent < 0 and new_rules.total_rank >= self.schedule.target_total:
            spent = step
        slots = {**state["trainable"]["slots"], "e": [jnp.asarray(x)[:, None].astype(jnp.float32) for x in new_e]}
        alloc = self._alloc_of(new_rules, spent)
        alloc.update(imp_ema=jnp.asarray(host["alloc"]["imp_ema"]), unc_ema=jnp.asarray(host["alloc"]["unc_ema"]))
        method_state = {**self._method_state_of(new_rules), "ipt": jnp.asarray(host["method"]["ipt"])}
        return {**state, "trainable": {**state["trainable"], "slots": slots}, "alloc": alloc, "method": method_state}

    # ------------------------------------------------------------- accounting
    def reachable_total_rank(self, num_steps: int) -> int:
        """The total rank growth reaches in ``num_steps`` steps without ties: min(top_h, target - total) modules
        gain ``incre_rank_num`` at each growth step g <= num_steps - 1 while total < target."""
        s = self.schedule
        total = self.setup.num_modules * self.setup.initial_rank
        for g in range(int(num_steps)):
            if total >= s.target_total:
                break
            if growth_due(g, s):
                total += min(s.top_h, s.target_total - total) * s.incre_rank_num
        return min(total, self.setup.num_modules * s.max_rank) if s.max_rank else total

    def extra_parameters(self, ranks: Mapping[str, int]) -> int:
        """One singular value E per committed rank."""
        return int(sum(int(r) for r in ranks.values()))
