"""AdaLoRA (Zhang et al. 2023b): its rules and ``adapter.method=adalora``, written from PEFT's
``tuners/adalora/{config,layer,model}.py``.

The pure rules first (``tests/test_adalora_rules.py`` drives PEFT itself with the same numbers), then the
``AdaLoRA`` method that runs them inside the jitted train step (``tests/test_adalora_method.py``: against PEFT's
``update_and_allocate`` fed the trainer's own weights and gradients, its forward and penalty, both exports).
docs/methods/adalora.md describes the method, its settings and presets.

Layout (our slot-leading one, so the factors are the adapters' ``a`` / ``b`` and the repo's orthogonality penalty
reads them as they are): per module m, ``e`` [R] (PEFT ``lora_E`` [r, 1]), ``a`` [R, in] (PEFT ``lora_A``) and
``b`` [R, out] (PEFT ``lora_B`` [out, r], transposed). ``params`` = ``{"e": [...], "a": [...], "b": [...]}``, one
entry per module, every module with the same R = ``init_r``; gradients and importance EMAs have the same shape.

Reference defaults (``AdaLoraConfig`` / ``LoraConfig`` in peft 0.21, ``REFERENCE_DEFAULTS`` below, checked by the
tests): ``init_r`` 12, ``target_r`` 8, ``tinit`` 0, ``tfinal`` 0, ``deltaT`` 1, ``beta1`` = ``beta2`` = 0.85,
``orth_reg_weight`` 0.5, ``lora_alpha`` 8, ``lora_dropout`` 0.0, ``total_step`` none (required, > 0). Init:
E = 0, A and B ~ N(0, 0.02). The AdaLoRA paper's GLUE scripts use other values (orth 0.1 or 0.3, target_rank 1,
lora_r 2 or 3; ``config/adalora_presets.py`` has them per task). The ``adapter.adalora.*`` defaults in
``config/schema.py`` are PEFT's; the shared fields keep the project's defaults (``adapter.r_max`` = init_r 8,
``adapter.alpha`` 16, ``adapter.init_std`` 0.02 as PEFT) unless a preset sets them.

Rules, as PEFT has them:

- budget: ``init_budget`` = number of triplets (modules x init_r), ``target_budget`` = modules x target_r;
  the budget stays at ``init_budget`` while step <= tinit, decays as a cubic to ``target_budget`` at
  ``total_steps - tfinal``, truncated to an int; masks are recomputed when step % deltaT == 0 in that phase.
- importance: ipt = |p * grad| element-wise (post-step p, pre-step grad: PEFT calls the allocator after
  ``optimizer.step()``); sensitivity EMA first, then the uncertainty EMA of |ipt - new sensitivity EMA|;
  element score = sensitivity * uncertainty; triplet score = s(E_j) + (mean_i s(A_ji) + mean_o s(B_oj)).
- masking: the threshold is the k-th smallest triplet score over all modules (k = init_budget - budget,
  ``torch.kthvalue``); every E_j whose score is ``<=`` it is zeroed (ties can mask more than k). Masked
  triplets stay trainable and can come back at the next re-mask.
- final phase: at step == total_steps - tfinal the EMAs are not updated, one last mask at the target budget is
  taken, its rank pattern frozen and the EMAs reset; every later step re-applies that pattern.
- forward: ``x -> ((x a^T) * e) b * alpha / (init_r + 1e-5)`` (ranknum stays init_r after masking); the scale
  uses ``init_r`` in place of ``lora_alpha`` when ``lora_alpha`` <= 0.
- orthogonal regulariser: the mean over the 2M factors of ||A A^T - I||_F and ||B^T B - I||_F, masked triplets
  included, times ``orth_reg_weight`` (``AdaLoraModel.forward``); this is ``methods.orthogonality.orthogonality_penalty``
  with every row committed, reused here, not written twice.

Deliberate differences:

- ``check_schedule`` refuses a schedule with no budgeting phase (tinit + tfinal >= total_steps), total_steps
  <= 0, a negative tinit / tfinal and deltaT < 1 with one line each, before any compute (PEFT raises from its
  config for the first two only; deltaT 0 fails there with ZeroDivisionError mid-training).
- ``mask_to_budget`` masks nothing when the budget is at least the number of triplets (target_r >= init_r);
  PEFT's ``kthvalue`` raises there.
- ``budget_schedule`` and ``allocate`` branch on the host step with Python numbers (the same float64 arithmetic
  as PEFT); the array rules (``update_importance``, ``triplet_scores``, ``mask_to_budget`` with a traced budget,
  ``apply_rank_pattern``, ``orthogonal_regulariser``, ``svd_delta``) can be jitted.
- Not here: DeepSpeed's gradient gathering, Conv2d / quantised layers.

In the trainer (``AdaLoRA`` below), also deliberate:

- global step = trainer step - 1 (the reference trainer calls ``update_and_allocate(state.global_step)`` before
  incrementing it); the gradients are clipped with ``optim.grad_clip`` by optax's rule (torch's
  ``clip_grad_norm_`` divides by ``norm + 1e-6``), the clip the optimiser applies;
- the evaluated / exported model keeps the rank pattern's rows only (what PEFT saves); between re-masks PEFT's
  in-memory model also uses masked triplets whose E regrew since the last mask. The train forward uses every row;
- ``adapter.rank_budget`` is the total target (PEFT: ``target_r`` x modules); ``adapter.orth_reg`` is not read
  (AdaLoRA's weight is ``adapter.adalora.orth_reg_weight``);
- an impossible schedule or budget is a ``ConfigError`` on construction (an epoch-based run: when the Trainer sets
  the run's length, before the first step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adapad_jax.adapters.layer import low_rank_delta
from adapad_jax.methods.orthogonality import orthogonality_penalty
from adapad_jax.methods.base import Method, MethodSetup, Tree

Params = dict[str, list[jax.Array]]
Importance = dict[str, Params]

RANKNUM_EPS = 1e-5
REFERENCE_DEFAULTS: dict[str, Any] = {
    "init_r": 12,
    "target_r": 8,
    "tinit": 0,
    "tfinal": 0,
    "deltaT": 1,
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
}
EMA_KEYS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def check_schedule(tinit: int, tfinal: int, total_steps: int, delta_t: int = 1) -> None:
    """Refuse an AdaLoRA schedule PEFT cannot run, with one line naming the problem."""
    if total_steps <= 0:
        raise ValueError(f"adalora: total_steps must be > 0, got {total_steps}")
    if tinit < 0 or tfinal < 0:
        raise ValueError(f"adalora: tinit and tfinal must be >= 0, got tinit={tinit}, tfinal={tfinal}")
    if delta_t < 1:
        raise ValueError(f"adalora: deltaT must be >= 1, got {delta_t}")
    if tinit + tfinal >= total_steps:
        raise ValueError(
            f"adalora: tinit + tfinal must be < total_steps to leave a budgeting phase, got tinit={tinit} + "
            f"tfinal={tfinal} = {tinit + tfinal} >= total_steps={total_steps}; lower tinit/tfinal or train longer"
        )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """AdaLoRA's static allocation settings (checked on construction)."""

    init_budget: int
    target_budget: int
    tinit: int
    tfinal: int
    total_steps: int
    delta_t: int = REFERENCE_DEFAULTS["deltaT"]
    beta1: float = REFERENCE_DEFAULTS["beta1"]
    beta2: float = REFERENCE_DEFAULTS["beta2"]

    def __post_init__(self):
        check_schedule(self.tinit, self.tfinal, self.total_steps, self.delta_t)


def budget_schedule(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_steps: int, delta_t: int = 1) -> tuple[int, bool]:
    """The rank budget at ``step`` and whether to re-mask now (PEFT ``RankAllocator.budget_schedule``)."""
    if step <= tinit:
        return init_budget, False
    decay_end = total_steps - tfinal
    if step > decay_end:
        return target_budget, True
    remaining = 1 - (step - tinit) / (decay_end - tinit)
    return int((init_budget - target_budget) * remaining**3 + target_budget), step % delta_t == 0


def init_importance(params: Params) -> Importance:
    """Zero ipt / sensitivity / uncertainty EMAs shaped like ``params``."""
    return {key: jax.tree.map(jnp.zeros_like, params) for key in EMA_KEYS}


def update_importance(importance: Importance, params: Params, grads: Params, *,
                      beta1: float = REFERENCE_DEFAULTS["beta1"],
                      beta2: float = REFERENCE_DEFAULTS["beta2"]) -> Importance:
    """One step of the element-wise EMAs of |p * grad| (PEFT ``RankAllocator.update_ipt``)."""
    ipt = jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)
    sensitivity = jax.tree.map(lambda s, i: beta1 * s + (1 - beta1) * i, importance["exp_avg_ipt"], ipt)
    uncertainty = jax.tree.map(lambda u, i, s: beta2 * u + (1 - beta2) * jnp.abs(i - s),
                               importance["exp_avg_unc"], ipt, sensitivity)
    return {"ipt": ipt, "exp_avg_ipt": sensitivity, "exp_avg_unc": uncertainty}


def triplet_scores(importance: Importance) -> list[jax.Array]:
    """Per module, [R] scores s(E_j) + (mean s(A_j.) + mean s(B_.j)) (PEFT ``_element_score`` / ``_combine_ipt``)."""
    score = jax.tree.map(jnp.multiply, importance["exp_avg_ipt"], importance["exp_avg_unc"])
    return [s_e + (jnp.mean(s_a, axis=1) + jnp.mean(s_b, axis=1))
            for s_e, s_a, s_b in zip(score["e"], score["a"], score["b"])]


def mask_to_budget(e: Sequence[jax.Array], scores: Sequence[jax.Array], budget: int | jax.Array
                   ) -> tuple[list[jax.Array], list[jax.Array]]:
    """Zero every E_j scoring ``<=`` the global k-th smallest score, k = #triplets - budget (PEFT ``mask_to_budget``).

    Returns the new ``e`` and the rank pattern (per module, [R] bool, True = kept).
    """
    flat = jnp.concatenate([jnp.ravel(s) for s in scores])
    k = flat.shape[0] - budget
    threshold = jnp.sort(flat)[jnp.clip(k - 1, 0, flat.shape[0] - 1)]
    pattern = [~((s <= threshold) & (k > 0)) for s in scores]
    return apply_rank_pattern(e, pattern), pattern


def apply_rank_pattern(e: Sequence[jax.Array], pattern: Sequence[jax.Array]) -> list[jax.Array]:
    """Zero the E entries a rank pattern drops (PEFT ``mask_using_rank_pattern``)."""
    return [jnp.where(keep, x, jnp.zeros_like(x)) for x, keep in zip(e, pattern)]


def init_state(params: Params) -> dict[str, Any]:
    """Allocator state before the first step: zero EMAs, no rank pattern yet."""
    return {"importance": init_importance(params), "rank_pattern": None}


def allocate(state: dict[str, Any], params: Params, grads: Params, step: int, schedule: Schedule
             ) -> tuple[list[jax.Array], dict[str, Any]]:
    """The new ``e`` and state after ``step`` (PEFT ``AdaLoraModel.update_and_allocate``, after the optimiser step)."""
    decay_end = schedule.total_steps - schedule.tfinal
    budget, mask_now = budget_schedule(
        step, init_budget=schedule.init_budget, target_budget=schedule.target_budget, tinit=schedule.tinit,
        tfinal=schedule.tfinal, total_steps=schedule.total_steps, delta_t=schedule.delta_t)
    if step < decay_end:
        importance = update_importance(state["importance"], params, grads,
                                       beta1=schedule.beta1, beta2=schedule.beta2)
        if not mask_now:
            return list(params["e"]), {"importance": importance, "rank_pattern": state["rank_pattern"]}
        e, pattern = mask_to_budget(params["e"], triplet_scores(importance), budget)
        return e, {"importance": importance, "rank_pattern": pattern}
    if step == decay_end:
        e, pattern = mask_to_budget(params["e"], triplet_scores(state["importance"]), budget)
        return e, {"importance": init_importance(params), "rank_pattern": pattern}
    if state["rank_pattern"] is None:
        raise ValueError(f"adalora: step {step} is in the final phase but step {decay_end} was never allocated")
    return apply_rank_pattern(params["e"], state["rank_pattern"]), state


def orthogonal_regulariser(params: Params) -> jax.Array:
    """PEFT's unweighted regulariser over every row (``AdaLoraModel.forward``); the caller multiplies by the weight."""
    committed = jnp.ones((len(params["a"]), params["a"][0].shape[0]), bool)
    return orthogonality_penalty({"a": params["a"], "b": params["b"]}, committed)


def svd_scale(lora_alpha: float, init_r: int) -> float:
    """The fixed forward scale alpha / (init_r + 1e-5); ``init_r`` stands in for alpha <= 0 as in PEFT."""
    return (lora_alpha if lora_alpha > 0 else float(init_r)) / (init_r + RANKNUM_EPS)


def svd_delta(x: jax.Array, e: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The adapter's output ``((x a^T) * e) b * scale`` (PEFT ``SVDLinear.forward`` minus the base layer)."""
    return low_rank_delta(x, a, b, e * scale)


def budget_tables(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """``budget_schedule`` at every 0-based step 0..total_steps, as int32 budgets and bool re-mask flags, so the
    jitted step indexes them with its traced step instead of syncing the step to the host."""
    rows = [budget_schedule(step, init_budget=schedule.init_budget, target_budget=schedule.target_budget,
                            tinit=schedule.tinit, tfinal=schedule.tfinal, total_steps=schedule.total_steps,
                            delta_t=schedule.delta_t) for step in range(schedule.total_steps + 1)]
    return np.asarray([b for b, _ in rows], np.int32), np.asarray([m for _, m in rows], bool)


def clip_by_global_norm(tree: Any, max_norm: float) -> Any:
    """``tree`` clipped as ``optax.clip_by_global_norm(max_norm)`` clips it (unchanged when ``max_norm`` <= 0)."""
    if not max_norm or max_norm <= 0:
        return tree
    clipped, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    return clipped


class AdaLoRA(Method):
    """``adapter.method=adalora`` on the method seam (``methods/base.py``): the rules above, in the jitted step.

    Slots: ``a`` [R, in], ``b`` [R, out] ~ N(0, init_std^2) and ``e`` [R, 1] = 0 per module (R = ``adapter.r_max``
    = PEFT's ``init_r``); every row trains every step (masked triplets stay trainable). ``alloc["committed"]`` is
    the rank pattern (all rows until the first mask), ``alloc["rank"]`` its row count per module.
    """

    name = "adalora"

    def __init__(self, settings: Any, targets: Sequence[Any], components: int = 1):
        super().__init__(settings, targets, components)
        self.set_total_steps(self.total_steps)

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        from adapad_jax.config.validation import check_components_divide
        from adapad_jax.runtime.failures import ConfigError

        init_r, budget = int(settings.r_max), int(settings.rank_budget)
        if init_r < 1:
            raise ConfigError(f"adapter.r_max={init_r} must be >= 1 (AdaLoRA's init_r)")
        check_components_divide(init_r, components)
        if not 1 <= budget <= num_modules * init_r:
            raise ConfigError(
                f"adapter.rank_budget={budget} (AdaLoRA's target budget, the total rank it ends at) must be between 1 "
                f"and the initial budget {num_modules} modules x adapter.r_max={init_r} = {num_modules * init_r}")
        return MethodSetup(num_modules, init_r, svd_scale(float(settings.alpha), init_r), init_r, budget,
                           grow=False, advance_learning=False)

    # ------------------------------------------------------------ schedule
    def schedule(self) -> Schedule:
        """The run's allocation schedule; refuses (one line, ``ConfigError``) one with no budgeting phase."""
        from adapad_jax.runtime.failures import ConfigError

        cfg = {**{k: REFERENCE_DEFAULTS[k] for k in ("tinit", "tfinal", "deltaT", "beta1", "beta2")}, **self.config}
        setup = self.setup
        try:
            return Schedule(init_budget=setup.num_modules * setup.num_slots, target_budget=setup.rank_budget,
                            tinit=int(cfg["tinit"]), tfinal=int(cfg["tfinal"]), total_steps=self.total_steps,
                            delta_t=int(cfg["deltaT"]), beta1=float(cfg["beta1"]), beta2=float(cfg["beta2"]))
        except ValueError as err:
            raise ConfigError(
                f"adapter.{err} (total_steps = this run's train steps; AdaLoRA's published tinit/tfinal, as in the "
                "GLUE presets, are for its full-length runs)") from None

    def set_total_steps(self, total_steps: int) -> None:
        """Checks the schedule at once, except for the 1-step placeholder the Trainer passes before an epoch-based
        run knows its length; the step checks it again when it compiles, before it runs."""
        super().set_total_steps(total_steps)
        if self.total_steps > 1:
            self.schedule()

    @property
    def orth_reg_weight(self) -> float:
        return float(self.config.get("orth_reg_weight", REFERENCE_DEFAULTS["orth_reg_weight"]))

    # --------------------------------------------------------------- state
    def init_slots(self, key: jax.Array) -> Tree:
        slots = super().init_slots(key)
        slots["e"] = [jnp.zeros((self.num_slots, 1), jnp.float32) for _ in self.targets]
        return slots

    def init_alloc(self) -> Tree:
        m, r = self.setup.num_modules, self.num_slots
        return {
            "committed": jnp.ones((m, r), bool),
            "reserve": jnp.zeros((m, r), bool),
            "rank": jnp.full((m,), r, jnp.int32),
            "imp_ema": jnp.zeros((m,), jnp.float32),
            "unc_ema": jnp.zeros((m,), jnp.float32),
            "budget_left": jnp.zeros((), jnp.int32),
            "budget_spent_step": jnp.asarray(-1, jnp.int32),
        }

    def init_method_state(self, trainable: Tree) -> Tree:
        return {"importance": init_importance(_triplets(trainable["slots"]))}

    # ------------------------------------------------------------- forward
    def forward_coefs(self, trainable: Tree, alloc: Tree, method_state: Tree, train: bool) -> jax.Array:
        """``e * alpha / (init_r + 1e-5)``; the evaluated model keeps the rank pattern's rows only (what PEFT saves)."""
        coefs = self.scaling * jnp.stack([e[:, 0] for e in trainable["slots"]["e"]])
        return coefs if train else coefs * alloc["committed"].astype(coefs.dtype)

    def live_mask(self, alloc: Tree, method_state: Tree) -> jax.Array:
        return jnp.ones((self.setup.num_modules, self.num_slots), bool)

    def num_live_rows(self, alloc: Tree, method_state: Tree) -> int:
        return self.num_slots

    # ------------------------------------------------------ loss and update
    def penalty_and_scores(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree
                           ) -> tuple[Tree, jax.Array, Any]:
        """``orth_reg_weight`` x the orthogonal regulariser over every row (``AdaLoraModel.forward``)."""
        weight = self.orth_reg_weight
        if weight <= 0:
            return grads, jnp.zeros((), jnp.float32), None
        slots = trainable["slots"]

        def penalty_fn(factors):
            return weight * orthogonal_regulariser(factors)

        penalty, extra = jax.value_and_grad(penalty_fn)({"a": slots["a"], "b": slots["b"]})
        new_slots = dict(grads["slots"])
        for part in ("a", "b"):
            new_slots[part] = [g + x for g, x in zip(grads["slots"][part], extra[part])]
        return {**grads, "slots": new_slots}, penalty, None

    def after_update(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree, scores: Any,
                     step: jax.Array, key: jax.Array) -> tuple[Tree, Tree, Tree, jax.Array]:
        """PEFT's ``update_and_allocate(global_step)`` after ``optimizer.step()``: global_step = ``step`` - 1 (the
        reference trainer passes ``state.global_step`` before its increment), post-step parameters, the gradients
        as ``clip_grad_norm_`` left them (``optim.grad_clip``)."""
        schedule = self.schedule()
        budgets, flags = budget_tables(schedule)
        global_step = jnp.asarray(step, jnp.int32) - 1
        index = jnp.clip(global_step, 0, schedule.total_steps)
        decay_end = schedule.total_steps - schedule.tfinal
        before, final, after = global_step < decay_end, global_step == decay_end, global_step > decay_end

        params = _triplets(trainable["slots"])
        clipped = clip_by_global_norm(grads, float(self.settings.optim.grad_clip))
        importance = method_state["importance"]
        updated = update_importance(importance, params, _triplets(clipped["slots"]),
                                    beta1=schedule.beta1, beta2=schedule.beta2)
        used = _select(before, updated, importance)
        triplet = triplet_scores(used)
        e = params["e"]
        masked_e, new_pattern = mask_to_budget(e, triplet, jnp.asarray(budgets)[index])
        mask_now = (before & jnp.asarray(flags)[index]) | final
        old_pattern = [alloc["committed"][m] for m in range(len(e))]
        frozen_e = apply_rank_pattern(e, old_pattern)
        new_e = [jnp.where(mask_now, x_mask, jnp.where(after, x_frozen, x))
                 for x, x_mask, x_frozen in zip(e, masked_e, frozen_e)]
        committed = jnp.where(mask_now, jnp.stack(new_pattern), alloc["committed"])
        new_importance = _select(before, updated, _select(final, init_importance(params), importance))

        slots = {**trainable["slots"], "e": [x[:, None] for x in new_e]}
        rank = committed.sum(axis=1).astype(jnp.int32)
        budget_now = jnp.asarray(budgets)[index]
        new_alloc = {
            **alloc,
            "committed": committed,
            "rank": rank,
            "imp_ema": jnp.stack([jnp.mean(s) for s in triplet]).astype(jnp.float32),
            "budget_left": jnp.maximum(budget_now - rank.sum(), 0).astype(jnp.int32),
            "budget_spent_step": jnp.where(final, jnp.asarray(step, jnp.int32), alloc["budget_spent_step"]),
        }
        return {**trainable, "slots": slots}, new_alloc, {**method_state, "importance": new_importance}, mask_now

    # -------------------------------------------------------------- export
    def native_settings(self) -> dict[str, Any]:
        """The ``AdaLoraConfig`` fields of this run (``target_r``: the target budget per module, rounded down).

        ``total_step`` is the run's length; where it is not known (a checkpoint of an epoch-based run re-exported
        by ``launch/export.py``) the least PEFT accepts, tinit + tfinal + 1: only PEFT's training reads it."""
        from adapad_jax.runtime.failures import ConfigError

        try:
            schedule = self.schedule()
        except ConfigError:
            cfg = {**REFERENCE_DEFAULTS, **self.config}
            schedule = dataclasses.replace(
                Schedule(init_budget=1, target_budget=1, tinit=0, tfinal=0, total_steps=1),
                tinit=int(cfg["tinit"]), tfinal=int(cfg["tfinal"]), delta_t=int(cfg["deltaT"]),
                beta1=float(cfg["beta1"]), beta2=float(cfg["beta2"]),
                total_steps=int(cfg["tinit"]) + int(cfg["tfinal"]) + 1)
        return {"init_r": self.num_slots, "target_r": max(self.setup.rank_budget // self.setup.num_modules, 1),
                "lora_alpha": float(self.settings.alpha), "tinit": schedule.tinit, "tfinal": schedule.tfinal,
                "deltaT": schedule.delta_t, "beta1": schedule.beta1, "beta2": schedule.beta2,
                "orth_reg_weight": self.orth_reg_weight, "total_step": schedule.total_steps}

    def export_native(self, out_dir: Any, model: Any, params: Any, host: Tree, base_model_name_or_path: str) -> Any:
        """The native PEFT AdaLoRA adapter (``models/adalora_export.py``) in ``out_dir/adapter_adalora``, from the
        gathered ``host`` state (``trainable``, ``alloc``)."""
        from pathlib import Path

        from adapad_jax.models.adalora_export import write_adalora_adapter
        from adapad_jax.outputs.layout import ADALORA_ADAPTER_DIR

        slots = host["trainable"]["slots"]
        pattern = host["alloc"]["committed"]
        return write_adalora_adapter(Path(out_dir) / ADALORA_ADAPTER_DIR, model, params, slots, pattern,
                                     self.native_settings(), base_model_name_or_path)

    def extra_parameters(self, ranks: Any) -> int:
        """One singular value E per kept triplet (AdaLoRA counts in + out + 1 per triplet)."""
        return int(sum(int(r) for r in ranks.values()))


def _triplets(slots: Tree) -> Params:
    """The slots as the rules' ``params``: ``e`` [R] (the slot part is [R, 1] for the shared Adam), ``a``, ``b``."""
    return {"e": [x[:, 0] for x in slots["e"]], "a": list(slots["a"]), "b": list(slots["b"])}


def _select(flag: jax.Array, if_true: Any, if_false: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), if_true, if_false)
