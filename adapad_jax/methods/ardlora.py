"""ARD-LoRA (Shinwari and Usama 2025) from the seed abstract only (no public code): rules and the seam's method.

``tests/test_ardlora_rules.py`` checks each rule against hand-computed values; ``tests/test_ardlora_method.py``
checks the trainer's step against a hand derivation. docs/methods/ardlora.md has the whole account.

What the abstract fixes (/work/shared/reference/ard_lora_abstract.txt): a learnable scaling factor alpha per
module (per layer and head in the paper), effective rank ``r = round(r0 * alpha)`` (BASELINES.md adds the
floor of 1: ``max(1, round(r0 * alpha))``), and the meta-objective ``task loss + lambda * (l1(alpha) +
beta * TV(alpha))``. It gives no defaults for r0, lambda, beta, the alpha learning rate or alpha's init, so
there are no reference defaults to state; ours are ``config.schema`` (lam 1e-3, beta 0.1, tau 0.5, alpha_lr 0 =
optim.learning_rate) and alpha starts at 1 (rank r0).

Our choices (the abstract does not say; each is ours and tested as such):

- layout: alpha is an array whose axis 0 is the layer index, e.g. [L] for one module type, [L, T] for T module
  types or [L, H] for heads; each module carries ``r_max`` slots (``a`` [r_max, in], ``b`` [r_max, out]), so the
  rank can grow past r0 up to ``r_max``. In the trainer: one alpha per adapted module in a [layers, module
  types] grid (``alpha_layout``, from the layer index in the module's name); not per head (a per-head rank is
  not a [modules, rows] coefficient nor a PEFT LoRA module).
- rounding: half up, ``floor(r0 * alpha + 0.5)`` (the abstract's nearest-integer bracket; numpy's half-to-even
  would make 2.5 -> 2 but 3.5 -> 4), then clipped to [1, r_max].
- relaxation: slot k (1-based) is on in the forward iff k <= the effective rank (a hard 0/1 mask); its gradient
  is that of the soft mask ``sigmoid((r0 * alpha - k + 0.5) / tau)`` (straight-through), which is 1/2 exactly
  at the rounding boundary ``r0 * alpha = k - 0.5``. Slot 1 is always on in the forward (the floor of 1) but
  still passes the soft mask's gradient to alpha. ``tau`` defaults to 0.5.
- regulariser: ``l1 = sum |alpha|`` (a sum, not a mean) and ``TV = sum |alpha[l+1] - alpha[l]|`` along axis 0
  (the layer index) summed over every other axis, i.e. across layers within one module type / head, never
  across module types; the term is ``lambda * (l1 + beta * TV)``. In the trainer only grid cells holding a
  module count (``grid_regulariser``).
- in the trainer: forward scale ``adapter.alpha / r_max`` (as adapad/joint, fixed as ranks move); both factors
  ~ N(0, init_std^2) (as adapad/joint); every row is in the train forward (a row outside the mask still passes
  alpha the soft mask's gradient) but only hard-mask rows are live for the optimiser (the others have zero
  gradient; their Adam moments and counts stay frozen until alpha switches them back on); alpha is trained by
  the shared AdamW (global Adam count, no weight decay, peak learning rate ``alpha_lr``, the shared schedule);
  the rank record (``committed``, ``rank``) follows alpha after every optimiser step; no rank budget of its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from adapad_jax.adapters.layer import low_rank_delta
from adapad_jax.config.validation import check_initial_rank
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.methods.base import Method, MethodSetup, Tree
from adapad_jax.outputs.rank_outputs import layer_and_type
from adapad_jax.runtime.failures import ConfigError

DEFAULT_TAU = 0.5


def init_alpha(shape: Sequence[int]) -> jax.Array:
    """Scaling factors at 1 (every module starts at rank r0)."""
    return jnp.ones(tuple(shape), jnp.float32)


def effective_rank(alpha: jax.Array, r0: int, r_max: int) -> jax.Array:
    """``clip(floor(r0 * alpha + 0.5), 1, r_max)`` as int32, element-wise."""
    return jnp.clip(jnp.floor(r0 * alpha + 0.5), 1, r_max).astype(jnp.int32)


def soft_mask(alpha: jax.Array, r0: int, r_max: int, tau: float = DEFAULT_TAU) -> jax.Array:
    """``sigmoid((r0 * alpha - k + 0.5) / tau)`` for k = 1..r_max, shape alpha.shape + (r_max,)."""
    k = jnp.arange(1, r_max + 1, dtype=jnp.float32)
    return jax.nn.sigmoid((r0 * alpha[..., None] - k + 0.5) / tau)


def hard_mask(alpha: jax.Array, r0: int, r_max: int) -> jax.Array:
    """1.0 for slots k <= the effective rank, else 0.0, shape alpha.shape + (r_max,)."""
    k = jnp.arange(1, r_max + 1)
    return (k <= effective_rank(alpha, r0, r_max)[..., None]).astype(jnp.float32)


def slot_mask(alpha: jax.Array, r0: int, r_max: int, tau: float = DEFAULT_TAU) -> jax.Array:
    """The straight-through mask: ``hard_mask`` forward, ``soft_mask``'s gradient backward."""
    soft = soft_mask(alpha, r0, r_max, tau)
    return hard_mask(alpha, r0, r_max) + soft - jax.lax.stop_gradient(soft)


def masked_delta(x: jax.Array, a: jax.Array, b: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """One module's adapter output ``((x a^T) * mask) b * scale`` with its [r_max] slot mask."""
    return low_rank_delta(x, a, b, mask * scale)


def total_variation(alpha: jax.Array) -> jax.Array:
    """``sum |alpha[l+1] - alpha[l]|`` along axis 0 (layers), summed over the other axes."""
    return jnp.sum(jnp.abs(jnp.diff(alpha, axis=0)))


def regulariser(alpha: jax.Array, lam: float, beta: float) -> jax.Array:
    """``lam * (sum |alpha| + beta * TV(alpha))``."""
    return lam * (jnp.sum(jnp.abs(alpha)) + beta * total_variation(alpha))


def alpha_layout(hf_paths: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
    """Where each module's alpha sits in the [layers, module types] grid: ``(rows, cols, grid shape)``.

    Rows are the distinct layer indices in the modules' names (``outputs.rank_outputs.layer_and_type``, sorted;
    a name without one is layer -1), columns the module types in order of first appearance.
    """
    parsed = [layer_and_type(path) for path in hf_paths]
    layers = sorted({layer for layer, _ in parsed})
    types: list[str] = []
    for _, kind in parsed:
        if kind not in types:
            types.append(kind)
    rows = tuple(layers.index(layer) for layer, _ in parsed)
    cols = tuple(types.index(kind) for _, kind in parsed)
    return rows, cols, (len(layers), len(types))


def grid_regulariser(alpha: jax.Array, rows: Sequence[int], cols: Sequence[int], lam: float, beta: float
                     ) -> jax.Array:
    """``regulariser`` over the grid cells that hold a module: per module type, its modules' alphas in layer order
    (TV only between consecutive present layers of one type; empty cells carry no term)."""
    total = jnp.zeros((), jnp.float32)
    for col in sorted(set(cols)):
        layer_rows = sorted(r for r, c in zip(rows, cols) if c == col)
        total = total + regulariser(alpha[jnp.asarray(layer_rows), col], lam, beta)
    return total


class ARDLoRA(Method):
    """``adapter.method=ardlora``: a learnable scaling factor alpha per module sets its rank ``round(r0 alpha)``.

    State: ``trainable["alpha"]`` [layers, module types] (trained by the shared AdamW with the global Adam count,
    no weight decay, learning rate ``adapter.ardlora.alpha_lr`` when set); ``slots`` ``a``/``b`` with ``r_max``
    rows per module, both ~ N(0, init_std^2) as adapad/joint. Forward coefficient of row k of module m:
    ``slot_mask(alpha_m)[k] * alpha / r_max`` (hard 0/1 forward, the soft mask's gradient to alpha). Loss term
    ``lam * (l1(alpha) + beta * TV(alpha))`` along layers per module type. After each optimiser step the rank
    record follows alpha: ``committed`` = the hard-mask rows, ``rank`` = the effective rank. No state of its own.
    """

    name = "ardlora"

    def __init__(self, settings: Any, targets: Sequence[Any], components: int = 1):
        super().__init__(settings, targets, components)
        config = self.config
        self.lam = float(config.get("lam", 1e-3))
        self.beta = float(config.get("beta", 0.1))
        self.tau = float(config.get("tau", DEFAULT_TAU))
        alpha_lr = float(config.get("alpha_lr", 0.0))
        self.alpha_lr_multiplier = alpha_lr / float(settings.optim.learning_rate) if alpha_lr > 0 else 1.0
        self.rows, self.cols, self.grid_shape = alpha_layout([t.hf_path for t in self.targets])
        # What the run's rank schedule reports (trainer.rank_schedule): any module may move by any amount at any
        # step, so the reachable total rank is the capacity, every module at r_max. Nothing else reads it.
        self.alloc_config = alloc_lib.AllocatorConfig(r_max=self.num_slots, top_k=max(self.setup.rank_budget, 1),
                                                      growth_interval=1, grow=True)

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        check_initial_rank(settings.initial_rank, settings.r_max)
        tau = float((getattr(settings, "method_config", {}) or {}).get("tau", DEFAULT_TAU))
        if tau <= 0:
            raise ConfigError(f"adapter.ardlora.tau={tau} must be > 0 (the soft slot mask's temperature)")
        # No rank target of its own (lam sets the ranks): the budget is the capacity, every module at r_max.
        return MethodSetup(num_modules, settings.r_max, float(settings.alpha) / settings.r_max,
                           settings.initial_rank, num_modules * settings.r_max, False, False)

    @property
    def r0(self) -> int:
        return self.setup.initial_rank

    def module_alpha(self, alpha: jax.Array) -> jax.Array:
        """[M]: each module's scaling factor, gathered from the [layers, module types] grid."""
        return alpha[jnp.asarray(self.rows), jnp.asarray(self.cols)]

    # ------------------------------------------------------------------ state
    def init_extra(self, key: jax.Array) -> Tree:
        return {"alpha": init_alpha(self.grid_shape)}

    def init_alloc(self) -> Tree:
        s = self.setup
        alloc = alloc_lib.init_allocator(s.num_modules, s.num_slots, s.initial_rank, s.rank_budget)
        return self._follow_alpha(alloc, init_alpha(self.grid_shape))

    def _follow_alpha(self, alloc: Tree, alpha: jax.Array) -> Tree:
        """The rank record of ``alpha``: committed = hard-mask rows, rank = effective rank, no reserve."""
        rank = effective_rank(self.module_alpha(alpha), self.r0, self.num_slots)
        committed = hard_mask(self.module_alpha(alpha), self.r0, self.num_slots) > 0
        budget_left = jnp.asarray(self.setup.rank_budget, jnp.int32) - rank.sum().astype(jnp.int32)
        return {**alloc, "committed": committed, "reserve": jnp.zeros_like(committed), "rank": rank,
                "budget_left": budget_left.astype(alloc["budget_left"].dtype)}

    # ---------------------------------------------------------------- forward
    def forward_coefs(self, trainable: Tree, alloc: Tree, method_state: Tree, train: bool) -> jax.Array:
        alpha = self.module_alpha(trainable["alpha"])
        if train:
            mask = slot_mask(alpha, self.r0, self.num_slots, self.tau)
        else:
            mask = hard_mask(alpha, self.r0, self.num_slots)
        return self.scaling * mask

    def live_mask(self, alloc: Tree, method_state: Tree) -> jax.Array:
        """The hard-mask rows: the only rows whose factors get a gradient (the others have coefficient 0); rows
        outside keep their Adam moments and counts frozen until alpha switches them back on."""
        return alloc["committed"]

    def num_live_rows(self, alloc: Tree, method_state: Tree) -> int:
        """Every row is in the train forward: a row outside the mask passes alpha the soft mask's gradient."""
        return self.num_slots

    # ----------------------------------------------------------- loss, update
    def penalty_and_scores(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree
                           ) -> tuple[Tree, jax.Array, Any]:
        """``lam * (l1(alpha) + beta * TV(alpha))`` and its gradient added to alpha's."""
        penalty, alpha_grad = jax.value_and_grad(
            lambda al: grid_regulariser(al, self.rows, self.cols, self.lam, self.beta))(trainable["alpha"])
        return {**grads, "alpha": grads["alpha"] + alpha_grad}, penalty, None

    def scale_updates(self, updates: Tree, step: jax.Array, lr: jax.Array, method_state: Tree) -> Tree:
        """alpha's peak learning rate ``alpha_lr`` (same warm-up and decay as the shared schedule)."""
        if self.alpha_lr_multiplier == 1.0:
            return updates
        return {**updates, "alpha": updates["alpha"] * self.alpha_lr_multiplier}

    def after_update(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree, scores: Any,
                     step: jax.Array, key: jax.Array) -> tuple[Tree, Tree, Tree, jax.Array]:
        new_alloc = self._follow_alpha(alloc, trainable["alpha"])
        changed = jnp.any(new_alloc["committed"] != alloc["committed"])
        return trainable, new_alloc, method_state, changed

    # ------------------------------------------------------------- accounting
    def extra_parameters(self, ranks: Any) -> int:
        """One scaling factor per adapted module."""
        return len(ranks)
