"""AdaPaD (SPEC §1-§2): rank-1 slots trained by parallel deflation, grown by the importance allocator.

Each live slot k has its own forward: slots below k from the stop-gradient snapshot, slot k live, nothing above
(``adapters.slots.deflated_lora``); the step sums the slot losses' gradients (``training/step.py``). Ranks grow
by ``allocator.update_allocator``: importance x uncertainty EMAs of each module's committed slots, top-k
promotion of the reserves every ``growth_interval`` steps after a warm-up round, until ``rank_budget``.
The forward scale is ``alpha / r_max``, fixed, so a module's slots keep their scale as it grows.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from adapad_jax.adapters.target import AdapterTarget
from adapad_jax.config.validation import check_components_divide, check_rank_budget
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.methods.base import Method, MethodSetup, Tree
from adapad_jax.methods.orthogonality import orthogonality_penalty

# IncreLoRA's advance learning: a reserve sits in the joint forward with a tiny singular value E until promoted.
JOINT_RESERVE_SCALE = 1e-5


def single_forward_weights(alloc: Tree, advance_learning: bool) -> jax.Array:
    """Per-slot [M, R] forward weight of the joint / lora train forward: committed 1, reserve ``E`` (joint).

    With the reserve at ``JOINT_RESERVE_SCALE`` (IncreLoRA's E = 1e-5) rather than full scale, the model that
    trains is the committed model that is evaluated and exported, up to ``E`` times the reserve's delta.
    """
    weights = alloc["committed"].astype(jnp.float32)
    if advance_learning:
        weights = weights + JOINT_RESERVE_SCALE * alloc["reserve"].astype(jnp.float32)
    return weights


class AllocatorMethod(Method):
    """Slots grown by AdaPaD's allocator (``allocator.py``); adapad, joint and (not growing) lora."""

    def __init__(self, settings: Any, targets: Sequence[AdapterTarget], components: int = 1):
        super().__init__(settings, targets, components)
        self.alloc_config = alloc_lib.AllocatorConfig(
            r_max=self.num_slots, top_k=settings.top_k, growth_interval=settings.growth_interval,
            beta1=settings.ema_beta1, beta2=settings.ema_beta2, importance=settings.importance,
            grow=self.setup.grow,
        )

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        check_components_divide(settings.r_max, components)
        grow = bool(settings.grow)
        budget = settings.rank_budget if grow else num_modules * settings.initial_rank
        check_rank_budget(budget, num_modules, settings.initial_rank)
        return MethodSetup(num_modules, settings.r_max, float(settings.alpha) / settings.r_max,
                           settings.initial_rank, budget, grow, bool(settings.advance_learning))

    def init_alloc(self) -> Tree:
        s = self.setup
        return alloc_lib.init_allocator(s.num_modules, s.num_slots, s.initial_rank, s.rank_budget)

    def live_mask(self, alloc: Tree, method_state: Tree) -> jax.Array:
        return alloc_lib.live_mask(alloc, self.setup.advance_learning)

    def forward_coefs(self, trainable: Tree, alloc: Tree, method_state: Tree, train: bool) -> jax.Array:
        weights = single_forward_weights(alloc, self.setup.advance_learning) if train else alloc["committed"]
        return self.scaling * weights.astype(jnp.float32)

    def penalty_and_scores(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree
                           ) -> tuple[Tree, jax.Array, jax.Array]:
        """AdaLoRA's orthogonality penalty on the committed rows (``adapter.orth_reg``), and the allocator's
        module importance."""
        slots, committed = trainable["slots"], alloc["committed"]
        orth_reg = float(self.settings.orth_reg)
        if orth_reg > 0:
            penalty, penalty_grads = jax.value_and_grad(lambda s: orth_reg * orthogonality_penalty(s, committed))(slots)
            grads = {"slots": jax.tree.map(jnp.add, grads["slots"], penalty_grads), "head": grads["head"]}
        else:
            penalty = jnp.zeros((), jnp.float32)
        return grads, penalty, alloc_lib.module_importance(slots, grads["slots"], committed)

    def after_update(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree, scores: Any,
                     step: jax.Array, key: jax.Array) -> tuple[Tree, Tree, Tree, jax.Array]:
        new_alloc, grew = alloc_lib.update_allocator(alloc, scores, step, self.alloc_config, key)
        return trainable, new_alloc, method_state, grew

    def host_update_due(self, step: int) -> bool:
        return bool(alloc_lib.is_growth_step(step, self.alloc_config))

    def num_live_rows(self, alloc: Tree, method_state: Tree) -> int:
        return max(alloc_lib.num_live_slots(alloc, self.setup.advance_learning), 1)

    def export_factors(self, trainable, alloc, method_state):
        from adapad_jax.adapters.slots import committed_peft_factors

        return committed_peft_factors(self.targets, trainable["slots"], alloc["committed"])


class AdaPaD(AllocatorMethod):
    """The paper's method: deflated per-slot gradients."""

    name = "adapad"
    deflated = True
