"""SoRA (Ding et al. 2023, sparse low-rank adaptation) as pure rules, written from ``TsinghuaC3I/SoRA``.

The rules as pure functions, and the ``SoRA`` method class at the bottom that runs them on the method seam
(``methods/base.py``). ``tests/test_sora_rules.py`` checks every rule against a NumPy re-derivation of the
reference files (``src/lora.py``, ``src/sparse_optimizer.py``, ``src/trainer.py``, ``src/util.py``,
``run_glue.py``, ``scripts/run_glue_sora_*.sh``); ``tests/test_sora_method.py`` checks the class in the Trainer.

Layout (the repo's slot-leading one): per module m, ``g`` [R] (reference ``gate`` [1, r]), ``a`` [R, in]
(reference ``lora_A``) and ``b`` [R, out] (reference ``lora_B`` [out, r], transposed).

Reference defaults (``REFERENCE_DEFAULTS`` below): ``lora_r`` 16 in ``run_glue.py``'s ``SparseArguments`` (8 in
``LowRankLinear`` and in both GLUE scripts), ``lora_alpha`` 16 (``config/lora_config.json``), dropout 0;
``sparse_lambda`` (eta, the L1 weight in the loss) 1e-3; ``sparse_lambda_2`` (xi, the threshold) 1e-3;
``sparse_lr`` = the main learning rate, with its own linear warm-up/decay schedule
(``get_linear_schedule_with_warmup``, warm-up ratio of the run); the gate optimiser is ``transformers.AdamW``'s
defaults: betas (0.9, 0.999), eps 1e-6, weight decay 0, ``correct_bias`` True (eps 1e-6, not the main
optimiser's ``adam_epsilon`` 1e-8: ``run_glue.py`` passes no eps to ``SparseAdamW``); ``lambda_schedule`` none,
``max_lambda`` 10, ``lambda_num`` 10. The adapted modules are opendelta's default q, k, v, attention output and
both FFN linears. Init: g ~ N(0, 1), A Kaiming-uniform (a = sqrt 5, i.e. U(-1/sqrt(in), 1/sqrt(in))), B = 0.
Scripts: STS-B eta 10, xi 3e-4, lr 8e-4; RTE ("schedule_dense") eta 1e-3, xi linear from 0 to 7e-4 over 7
values, lr 1.2e-3; both r 8, clip 0.1.

Rules, as the reference has them:

- forward: ``((x A^T) * g) B^T * alpha / r`` (``LowRankLinear.forward``); here ``g * alpha / r`` is folded into the
  per-slot coefficient of ``adapters.layer.low_rank_delta``.
- loss: ``eta * sum_all |g| / (number of gate entries over all modules)`` (``SparseTrainerMixin.compute_loss``),
  i.e. a mean over every gate of every module, not per module.
- gate step (``SparseAdamW.step``): HF AdamW with the bias correction folded into the step size,
  ``p += -lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` (eps added to sqrt(v) before correction),
  weight decay ``-lr * wd * p`` on the pre-step p; then the threshold by xi itself, NOT times lr (the file
  ``run_glue.py`` imports is ``sparse_optimizer.py``; ``sparse_optimizer_multiply_lr.py`` is unused).
- the threshold is three in-place masked writes done in order: ``p[p > xi] -= xi``, ``p[p < -xi] += xi``,
  ``p[|p| < xi] = 0``; the third mask reads the already-shifted values, so the rule is NOT textbook soft
  thresholding: |p| < xi -> 0; |p| == xi stays; xi < |p| < 2 xi -> 0; |p| == 2 xi -> sign(p) xi;
  |p| > 2 xi -> p - sign(p) xi. ``reference_threshold`` reproduces exactly that; xi <= 0 does nothing.
- xi schedule (``SparseAdamW._build_lambda_list`` / ``step_lambda``): stage 0 uses xi itself; each later
  training stage (15 epochs each in ``run_glue.py``, ``lambda_num - 1`` of them) takes the next entry of
  ``linear``: linspace(xi, max, n); ``log_linear``: log(linspace(e^xi, e^max, n)); ``exp_linear``:
  exp(linspace(log xi, log max, n)); past the end the last value is kept.
- rank: a slot whose gate is exactly 0 is not committed. Its A and B rows get no gradient while it is 0 (their
  coefficient is 0), but the gate itself still does, so a later step (its Adam momentum plus the new gradient)
  can move it past the threshold again: the slot revives. Nothing is ever pruned for good during training.
- ``src/util.py``'s count: every trainable non-gate parameter (all A/B at full rank plus whatever else the run
  leaves trainable, passed here as ``other_trainable``: the head, per BASELINES.md, and the unfrozen norms)
  minus ``2 * hidden_size`` per zero gate. That is right for a hidden x hidden module but deducts only
  2 * 768 = 1,536 of the 768 + 3,072 = 3,840 factor entries a zero gate frees on a DeBERTaV3-base FFN module, so
  its "sparse" count is too high by 2,304 per zeroed FFN slot; gates are left out of both of its numbers.
  ``parameter_counts`` gives ours (factors of non-zero gates, gates, head separately) beside it.

Deliberate differences:

- ``gate_step`` computes ``1 - beta^t`` as ``-expm1(t log beta)`` in float32 (the reference does it in Python
  float64); float32 ``1 - 0.999**t`` would be off by ~1e-5 relative in the early steps.
- ``gate_step`` is a pure function, not an optax ``GradientTransformation``: the threshold must leave exact
  zeros, and ``optax.apply_updates`` (p + (new - p)) does not guarantee that in floating point.
- ``check_xi_schedule`` refuses an unknown kind, lambda_num < 1, and ``exp_linear`` from xi <= 0 (the reference
  takes log(0) and starts from -inf / nan) with one line each, before any compute.
- the gates' share of global gradient clipping (the reference clips every parameter together, max norm 0.1 in
  the scripts) and the sparse lr schedule are the trainer's; ``gate_step`` takes the lr of the step.
- ``export_fold`` returns rank 0 for a module whose gates are all zero; PEFT cannot hold r = 0, so the caller
  leaves such a module out of ``target_modules`` / ``rank_pattern``.

In the trainer (class ``SoRA``; the order of ``training/step.py``):

- R = ``adapter.r_max`` (the reference's ``lora_r``), forward scale ``adapter.alpha / R``; the gates are the
  trainable leaf ``trainable["gates"]`` ([M] arrays [R]), outside the shared AdamW (``optimizer_params``), as
  the reference removes ``lora.gate`` from its main optimiser; ``gate_step``'s state is
  ``state["method"]["gate_adam"]`` (checkpointed, so resume is bit-exact).
- ``penalty_and_scores`` adds eta's gradient as ``eta * sign(g) / #gates`` (torch's d|g|/dg, 0 at g = 0;
  ``jax.grad(jnp.abs)(0.)`` is 1), then clips every gradient together (slots, head and gates) as
  ``torch.nn.utils.clip_grad_norm_``: times ``min(1, max_norm / (norm + 1e-6))`` with ``optim.grad_clip``. The
  shared optimiser's own clip then sees a norm below the limit and does nothing, so the slots, head and gates get
  the reference's jointly clipped gradients. The logged ``grad_norm`` is therefore the clipped norm.
- ``after_update`` runs ``gate_step`` on those gradients at the gate lr of the step (``sparse_lr``, 0 =
  ``optim.learning_rate``, on ``get_linear_schedule_with_warmup`` with ``optim.warmup_steps`` and the run's
  length, whatever ``optim.schedule`` the shared optimiser uses), after the shared step, as the reference calls
  ``sparse_optimizer.step()`` after ``optimizer.step()``; then ``alloc["committed"] = g != 0`` and
  ``alloc["rank"]`` its count per module. Every row is live (``live_mask``): the reference's AdamW steps whole
  A / B matrices, so a zero-gate row (gradient 0) moves on its decaying momentum with the global step count.
- xi stages: the reference runs its schedule after the main training, as ``lambda_num - 1`` further 15-epoch
  runs that reuse the already-decayed schedulers (lr 0: they only threshold). One run here has stages of
  ``adapter.sora.stage_steps`` steps inside the run (stage ``(step - 1) // stage_steps``); the method does not
  know the epoch length, so a schedule needs ``stage_steps >= 1`` and ``stage_steps = 0`` is one stage (xi
  constant), refused with a schedule set.
- No budget: ``setup.rank_budget`` is ``M * R`` (all gates); the rank the run ends at is reported.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.adapters.layer import low_rank_delta
from adapad_jax.methods.base import Method, MethodSetup, Tree

REFERENCE_DEFAULTS: dict[str, Any] = {
    "lora_r": 16,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "sparse_lambda": 1e-3,
    "sparse_lambda_2": 1e-3,
    "lambda_schedule": None,
    "max_lambda": 10.0,
    "lambda_num": 10,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "stage_epochs": 15,
}
XI_SCHEDULES = ("linear", "log_linear", "exp_linear")


def init_module(key: jax.Array, rank: int, in_features: int, out_features: int) -> dict[str, jax.Array]:
    """One module's SoRA factors: g ~ N(0, 1) [R], A ~ U(+-1/sqrt(in)) [R, in] (Kaiming a=sqrt 5), B = 0 [R, out]."""
    key_g, key_a = jax.random.split(key)
    bound = 1.0 / math.sqrt(in_features)
    return {
        "g": jax.random.normal(key_g, (rank,), jnp.float32),
        "a": jax.random.uniform(key_a, (rank, in_features), jnp.float32, -bound, bound),
        "b": jnp.zeros((rank, out_features), jnp.float32),
    }


def scaling(lora_alpha: float, rank: int) -> float:
    """The reference's fixed forward scale alpha / r."""
    return lora_alpha / rank


def gated_delta(x: jax.Array, g: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The adapter's output ``((x a^T) * g) b * scale`` (``LowRankLinear.forward``)."""
    return low_rank_delta(x, a, b, g * scale)


def l1_gate_penalty(gates: Sequence[jax.Array], eta: float) -> jax.Array:
    """``eta * sum |g| / #gates`` over all modules together (``SparseTrainerMixin.compute_loss``)."""
    total = sum(jnp.sum(jnp.abs(g)) for g in gates)
    count = sum(int(np.prod(g.shape)) for g in gates)
    return eta * total / count


def reference_threshold(p: jax.Array, xi: float | jax.Array) -> jax.Array:
    """``SparseAdamW``'s three in-order masked writes by xi (see the module docstring); nothing when xi <= 0."""
    shifted = jnp.where(p > xi, p - xi, p)
    shifted = jnp.where(shifted < -xi, shifted + xi, shifted)
    shifted = jnp.where(jnp.abs(shifted) < xi, jnp.zeros_like(shifted), shifted)
    return jnp.where(xi > 0, shifted, p)


class GateState(NamedTuple):
    """Adam moments of the gates and the number of steps taken."""

    count: jax.Array
    exp_avg: list[jax.Array]
    exp_avg_sq: list[jax.Array]


def init_gate_state(gates: Sequence[jax.Array]) -> GateState:
    """Zero moments, step 0 (``SparseAdamW`` state initialisation)."""
    zeros = [jnp.zeros_like(g) for g in gates]
    return GateState(jnp.zeros((), jnp.int32), zeros, [jnp.zeros_like(g) for g in gates])


def gate_step(gates: Sequence[jax.Array], grads: Sequence[jax.Array], state: GateState, *,
              lr: float | jax.Array, xi: float | jax.Array,
              betas: tuple[float, float] = REFERENCE_DEFAULTS["betas"], eps: float = REFERENCE_DEFAULTS["eps"],
              weight_decay: float = REFERENCE_DEFAULTS["weight_decay"]) -> tuple[list[jax.Array], GateState]:
    """One ``SparseAdamW.step``: HF AdamW (bias correction in the step size), then ``reference_threshold`` by xi."""
    beta1, beta2 = betas
    count = state.count + 1
    t = count.astype(jnp.float32)
    # 1 - beta^t as -expm1(t log beta): float32 ``1 - 0.999**t`` loses ~1e-5 of the step to cancellation
    correction1 = -jnp.expm1(t * math.log(beta1)) if beta1 > 0 else 1.0
    correction2 = -jnp.expm1(t * math.log(beta2)) if beta2 > 0 else 1.0
    step_size = lr * jnp.sqrt(correction2) / correction1
    exp_avg = [beta1 * m + (1.0 - beta1) * g for m, g in zip(state.exp_avg, grads)]
    exp_avg_sq = [beta2 * v + (1.0 - beta2) * g * g for v, g in zip(state.exp_avg_sq, grads)]
    new_gates = []
    for p, m, v in zip(gates, exp_avg, exp_avg_sq):
        to_add = -step_size * (m / (jnp.sqrt(v) + eps))
        if weight_decay > 0.0:
            to_add = to_add - lr * weight_decay * p
        new_gates.append(reference_threshold(p + to_add, xi))
    return new_gates, GateState(count, exp_avg, exp_avg_sq)


def check_xi_schedule(kind: str | None, xi: float, max_xi: float, num: int) -> None:
    """Refuse a xi schedule the reference cannot run sensibly, with one line naming the problem."""
    if kind is None:
        return
    if kind not in XI_SCHEDULES:
        raise ValueError(f"sora: xi schedule must be one of {', '.join(XI_SCHEDULES)} or none, got {kind!r}")
    if num < 1:
        raise ValueError(f"sora: the xi schedule needs lambda_num >= 1, got {num}")
    if kind == "exp_linear" and (xi <= 0 or max_xi <= 0):
        raise ValueError(f"sora: exp_linear needs xi > 0 and max_xi > 0 (it takes their logs), got {xi}, {max_xi}")


def xi_values(kind: str, xi: float, max_xi: float, num: int) -> np.ndarray:
    """The reference's list of thresholds (``SparseAdamW._build_lambda_list``), float64."""
    check_xi_schedule(kind, xi, max_xi, num)
    if kind == "linear":
        return np.linspace(xi, max_xi, num)
    if kind == "log_linear":
        return np.log(np.linspace(np.exp(xi), np.exp(max_xi), num))
    return np.exp(np.linspace(np.log(xi), np.log(max_xi), num))


def xi_at_stage(stage: int, kind: str | None, xi: float, max_xi: float = REFERENCE_DEFAULTS["max_lambda"],
                num: int = REFERENCE_DEFAULTS["lambda_num"]) -> float:
    """xi in training stage ``stage``: xi itself at stage 0, then the list entry, held at the last one."""
    if kind is None or stage <= 0:
        check_xi_schedule(kind, xi, max_xi, num)
        return float(xi)
    values = xi_values(kind, xi, max_xi, num)
    return float(values[min(stage, len(values) - 1)])


def committed(gates: Sequence[jax.Array]) -> list[jax.Array]:
    """Per module, [R] bool: the slot counts (its gate is not exactly 0)."""
    return [g != 0 for g in gates]


def ranks(gates: Sequence[jax.Array]) -> list[int]:
    """Per module, the number of non-zero gates."""
    return [int(np.count_nonzero(np.asarray(g))) for g in gates]


def parameter_counts(gates: Sequence[jax.Array], shapes: Sequence[tuple[int, int]], head: int = 0
                     ) -> dict[str, int]:
    """Our count: factors of non-zero gates (in + out each), all gate entries, and the head, separately."""
    factors = sum(r * (fan_in + fan_out) for r, (fan_in, fan_out) in zip(ranks(gates), shapes))
    return {"factors": factors, "gates": sum(int(np.prod(g.shape)) for g in gates), "head": head}


def reference_count(gates: Sequence[jax.Array], shapes: Sequence[tuple[int, int]], hidden_size: int,
                    other_trainable: int = 0) -> tuple[int, int]:
    """``src/util.py``'s (sparse, total): full-rank A/B plus other trainables, minus 2 * hidden per zero gate."""
    total = sum(int(g.shape[0]) * (fan_in + fan_out) for g, (fan_in, fan_out) in zip(gates, shapes))
    total += other_trainable
    zeros = sum(int(np.prod(g.shape)) - r for g, r in zip(gates, ranks(gates)))
    return total - zeros * hidden_size * 2, total


def export_fold(g: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> dict[str, Any]:
    """One module ready for PEFT LoRA at scaling 1: zero gates dropped, ``g * scale`` folded into ``b``.

    Returns ``a`` [k, in] (PEFT ``lora_A``), ``b`` [k, out] (PEFT ``lora_B`` transposed) and ``rank`` k; give PEFT
    ``r = lora_alpha = k`` for this module so its own scaling is 1.
    """
    keep = np.flatnonzero(np.asarray(g))
    coef = np.asarray(g, np.float64)[keep] * scale
    a_kept = np.asarray(a)[keep]
    b_kept = (np.asarray(b, np.float64)[keep] * coef[:, None]).astype(np.asarray(b).dtype)
    return {"a": a_kept, "b": b_kept, "rank": int(keep.size)}


def linear_warmup_lr(step0: jax.Array, peak: float, warmup: int, total: int) -> jax.Array:
    """``transformers.get_linear_schedule_with_warmup`` at 0-based ``step0``: ``peak * step/warmup`` during warm-up,
    then ``peak * (total - step) / (total - warmup)``, never below 0 (``run_glue.py``'s ``sparse_scheduler``)."""
    step = jnp.asarray(step0, jnp.float32)
    warm = step / max(warmup, 1)
    decay = jnp.maximum(0.0, (total - step) / max(total - warmup, 1))
    return peak * jnp.where(step < warmup, warm, decay)


def clip_like_torch(grads: Any, max_norm: float) -> Any:
    """``torch.nn.utils.clip_grad_norm_`` over the whole tree: times ``min(1, max_norm / (norm + 1e-6))``."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)


class SoRA(Method):
    """``adapter.method=sora`` on the method seam (``methods/base.py``).

    Slots ``a`` / ``b`` (R = ``adapter.r_max`` = the reference's ``lora_r``), the gates as the trainable leaf
    ``trainable["gates"]`` ([M] arrays [R]) trained by ``gate_step`` in ``after_update``, never by the shared AdamW;
    the gate optimiser's state is ``state["method"]["gate_adam"]``. ``alloc["committed"]`` = gate != 0.
    """

    name = "sora"
    zero_b = True

    # ------------------------------------------------------------------ setup
    def fields(self) -> dict[str, Any]:
        """``adapter.sora.*`` with the schema's defaults for fields a hand-built settings object leaves out."""
        defaults = {"sparse_lambda": REFERENCE_DEFAULTS["sparse_lambda"],
                    "sparse_lambda_2": REFERENCE_DEFAULTS["sparse_lambda_2"], "sparse_lr": 0.0,
                    "lambda_schedule": "", "max_lambda": REFERENCE_DEFAULTS["max_lambda"],
                    "lambda_num": REFERENCE_DEFAULTS["lambda_num"], "stage_steps": 0}
        return {**defaults, **self.config}

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        from adapad_jax.runtime.failures import ConfigError

        rank = int(settings.r_max)
        if rank < 1:
            raise ConfigError(f"adapter.r_max={rank} must be >= 1 (SoRA's lora_r: gates per module)")
        f = self.fields()
        kind = f["lambda_schedule"] or None
        try:
            check_xi_schedule(kind, float(f["sparse_lambda_2"]), float(f["max_lambda"]), int(f["lambda_num"]))
        except ValueError as err:
            raise ConfigError(f"adapter.sora.lambda_schedule: {err}") from None
        if kind is not None and int(f["stage_steps"]) < 1:
            raise ConfigError("adapter.sora.stage_steps must be >= 1 with adapter.sora.lambda_schedule set: the "
                              "reference's stages are 15 epochs each, and the method does not know the epoch length")
        return MethodSetup(num_modules, rank, scaling(float(settings.alpha), rank), rank, num_modules * rank,
                           False, False)

    def xi_table(self) -> np.ndarray:
        """xi of stage 0, 1, ... (the last entry holds for every later stage)."""
        f = self.fields()
        kind = f["lambda_schedule"] or None
        num = int(f["lambda_num"]) if kind is not None else 1
        return np.array([xi_at_stage(s, kind, float(f["sparse_lambda_2"]), float(f["max_lambda"]),
                                     int(f["lambda_num"])) for s in range(num)], np.float32)

    def xi_at_step(self, step: jax.Array) -> jax.Array:
        """xi for 1-based ``step``: stage ``(step - 1) // stage_steps`` (one stage for the whole run when 0)."""
        table = jnp.asarray(self.xi_table())
        stage_steps = int(self.fields()["stage_steps"])
        if stage_steps < 1:
            return table[0]
        stage = jnp.minimum((jnp.asarray(step) - 1) // stage_steps, table.shape[0] - 1)
        return table[stage]

    def gate_lr_at(self, step0: jax.Array) -> jax.Array:
        """The gates' lr at 0-based ``step0``: ``sparse_lr`` (0: ``optim.learning_rate``) on a linear warm-up of
        ``optim.warmup_steps`` and linear decay to 0 at the run's end, whatever ``optim.schedule`` is."""
        optim = self.settings.optim
        peak = float(self.fields()["sparse_lr"]) or float(optim.learning_rate)
        total = self.total_steps
        return linear_warmup_lr(step0, peak, min(max(int(optim.warmup_steps), 0), total), total)

    # ------------------------------------------------------------------ state
    def _modules(self, key: jax.Array) -> list[dict[str, jax.Array]]:
        return [init_module(jax.random.fold_in(key, m), self.num_slots, t.in_features, t.out_features)
                for m, t in enumerate(self.targets)]

    def init_slots(self, key: jax.Array) -> Tree:
        """A Kaiming-uniform, B = 0 (``init_module``)."""
        modules = self._modules(key)
        return {"a": [mod["a"] for mod in modules], "b": [mod["b"] for mod in modules]}

    def init_extra(self, key: jax.Array) -> Tree:
        """The gates, N(0, 1) (``init_module``)."""
        return {"gates": [mod["g"] for mod in self._modules(key)]}

    def init_alloc(self) -> Tree:
        from adapad_jax.methods import allocator as alloc_lib

        s = self.setup
        return alloc_lib.init_allocator(s.num_modules, s.num_slots, s.num_slots, s.rank_budget)

    def init_method_state(self, trainable: Tree) -> Tree:
        state = init_gate_state(trainable["gates"])
        return {"gate_adam": {"count": state.count, "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}}

    # ---------------------------------------------------------------- forward
    def forward_coefs(self, trainable: Tree, alloc: Tree, method_state: Tree, train: bool) -> jax.Array:
        """``g * alpha / r`` in training and evaluation alike (a zero gate is a zero row)."""
        return jnp.stack(trainable["gates"]).astype(jnp.float32) * self.scaling

    def live_mask(self, alloc: Tree, method_state: Tree) -> jax.Array:
        """Every row: the reference's AdamW steps whole A / B matrices, so a zero-gate row (gradient 0) still
        moves on its decaying momentum and its step count runs with the global one (a revived row's bias
        correction is the reference's)."""
        return jnp.ones((self.setup.num_modules, self.num_slots), bool)

    # ----------------------------------------------------------- loss, update
    def penalty_and_scores(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree
                           ) -> tuple[Tree, jax.Array, Any]:
        """The L1 term's gradient on the gates, then the reference's clipping of every gradient together."""
        eta = float(self.fields()["sparse_lambda"])
        gates = trainable["gates"]
        penalty = l1_gate_penalty(gates, eta)
        # torch's d|g|/dg is sign(g), 0 at g = 0; jax.grad(jnp.abs)(0.0) is 1, which would push a zero gate
        # (and, through the shared clipping norm, every other gradient) where the reference does not.
        count = sum(int(np.prod(g.shape)) for g in gates)
        grads = {**grads, "gates": [gr + eta * jnp.sign(g) / count for gr, g in zip(grads["gates"], gates)]}
        clip = float(self.settings.optim.grad_clip or 0.0)
        if clip > 0:
            grads = clip_like_torch(grads, clip)
        return grads, penalty, None

    def optimizer_params(self, tree: Tree) -> Tree:
        """Everything but the gates (their own optimiser runs in ``after_update``)."""
        return {k: v for k, v in tree.items() if k != "gates"}

    def after_update(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree, scores: Any,
                     step: jax.Array, key: jax.Array) -> tuple[Tree, Tree, Tree, jax.Array]:
        """``SparseAdamW.step`` (``gate_step``) at this step's gate lr and xi, then the rank record from the gates."""
        adam = method_state["gate_adam"]
        gates, state = gate_step(trainable["gates"], grads["gates"],
                                 GateState(adam["count"], adam["exp_avg"], adam["exp_avg_sq"]),
                                 lr=self.gate_lr_at(step - 1), xi=self.xi_at_step(step))
        committed_now = jnp.stack(committed(gates))
        new_alloc = {**alloc, "committed": committed_now, "rank": committed_now.sum(axis=1).astype(jnp.int32)}
        changed = jnp.any(committed_now != alloc["committed"])
        new_state = {**method_state, "gate_adam": {"count": state.count, "exp_avg": state.exp_avg,
                                                   "exp_avg_sq": state.exp_avg_sq}}
        return {**trainable, "gates": gates}, new_alloc, new_state, changed

    # ----------------------------------------------------------------- export
    def export_factors(self, trainable, alloc, method_state):
        """``export_fold`` at scale 1 (B times g; the writer's alpha_pattern carries alpha / r); modules whose
        gates are all zero are left out."""
        out = {}
        for m, target in enumerate(self.targets):
            fold = export_fold(trainable["gates"][m], trainable["slots"]["a"][m], trainable["slots"]["b"][m], 1.0)
            if fold["rank"]:
                out[target.hf_path] = (fold["a"], fold["b"].T.copy())
        return out

    # ------------------------------------------------------------- accounting
    def extra_parameters(self, ranks: Mapping[str, int]) -> int:
        """One gate per kept rank (folded into B on export)."""
        return int(sum(int(r) for r in ranks.values()))

    def paper_parameter_count(self, gates: Sequence[Any], hidden_size: int, other_trainable: int = 0
                              ) -> tuple[int, int]:
        """``src/util.py``'s (sparse, total) count (``reference_count``) for these gates and this model's targets."""
        shapes = [(t.in_features, t.out_features) for t in self.targets]
        return reference_count([np.asarray(g) for g in gates], shapes, hidden_size, other_trainable)
