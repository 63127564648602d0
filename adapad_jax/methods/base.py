"""The method seam: what differs between the adapter methods the trainer runs, and nothing else.

A method is a ``Method`` subclass in its own module (``methods/<name>.py``) plus a line in
``methods/registry.py``. The train step (``training/step.py``) is the same for every method and asks the method:

- ``setup`` (on construction): rows per module ``num_slots``, the forward scale, the initial rank and budget;
- extra state: ``init_slots`` (the ``slots`` parts: ``a``, ``b`` and e.g. a per-slot singular value ``e``),
  ``init_extra`` (other trainable leaves, e.g. gates), ``init_alloc`` (the rank record every method keeps:
  ``committed`` / ``rank`` / ``reserve`` ... see ``allocator.py``), ``init_method_state`` (its own
  non-trainable state: EMAs, a gate optimiser, a schedule);
- the forward: ``forward_coefs`` -> the per-row coefficient [M, R] of the one joint forward (scaling, masks,
  singular values and gates folded in), differentiable in ``trainable``; ``deflated`` methods (adapad) run one
  forward per live slot instead (``adapters.slots.deflated_lora``);
- loss terms and scores: ``penalty_and_scores`` -> the gradient with the method's own loss terms added, the
  penalty, and what its rank update reads (importance), from the pre-update parameters;
- the optimiser: ``live_mask`` (slot rows that train and count Adam steps), ``optimizer_params`` (what the
  shared AdamW trains), ``scale_updates`` (per-row learning-rate multipliers);
- the rank update after the optimiser step: ``after_update`` (grow, mask, gate) on the jitted step, and
  ``host_update`` between steps for rules that change shapes or Python-side bookkeeping;
- the export: ``export_factors`` -> ``{hf_path: (A [r, in], B [out, r])}`` with everything folded into B so that
  the update is ``scaling * B @ A``; optionally ``export_native(out_dir, model, params, host_state, base)``, a
  PEFT form of the method's own written beside ``adapter/`` (adalora: ``AdaLoraConfig``);
- the accounting: ``parameter_counts`` / ``accounting`` (``extra_parameters``, ``reserve_rows``,
  ``paper_parameters``).

Methods sit below ``training/`` so the step can call them; they never import the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.adapters import slots as slots_lib
from adapad_jax.adapters.target import AdapterTarget

Tree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MethodSetup:
    """What a method resolves from the run's settings and model before any state exists."""

    num_modules: int
    num_slots: int  # R: slot rows per module
    scaling: float  # the forward scale s of ``coef = s * ...`` for the shared rows
    initial_rank: int
    rank_budget: int  # the total rank the allocator may reach (lora: every module's rank)
    grow: bool
    advance_learning: bool


class Method:
    """Defaults shared by every method; a subclass overrides what its paper changes."""

    name: ClassVar[str] = ""
    deflated: ClassVar[bool] = False  # per-slot deflated gradients (adapad) instead of one joint forward
    zero_b: ClassVar[bool] = False  # B starts at 0 (lora), else both factors ~ N(0, init_std^2)
    # The joint forward also returns dL/dW of every adapted frozen kernel (= dL/d(delta W)) as ``grads["weights"]``
    # ([M] arrays [in, out]) to ``penalty_and_scores``; it never reaches the optimiser. IncreLoRA's score needs it.
    weight_gradients: ClassVar[bool] = False

    def __init__(self, settings: Any, targets: Sequence[AdapterTarget], components: int = 1):
        """``settings``: ``training.settings.TrainerSettings`` (or any object with its fields)."""
        self.settings = settings
        self.targets = tuple(targets)
        self.components = components
        self.setup = self.make_setup(settings, len(self.targets), components)
        self.total_steps = max(int(getattr(settings, "num_steps", 1)), 1)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length (its schedules end there); the trainer sets it before compiling a step."""
        self.total_steps = max(int(total_steps), 1)

    @property
    def config(self) -> dict[str, Any]:
        """This method's own ``adapter.<method>.*`` fields (``{}`` for adapad, joint, lora)."""
        return dict(getattr(self.settings, "method_config", {}) or {})

    # ------------------------------------------------------------------ setup
    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        """Rows per module, scale, initial rank, budget; refuses settings the method cannot run."""
        raise NotImplementedError

    @property
    def num_slots(self) -> int:
        return self.setup.num_slots

    @property
    def scaling(self) -> float:
        return self.setup.scaling

    # ------------------------------------------------------------------ state
    def init_slots(self, key: jax.Array) -> Tree:
        """The ``slots`` tree: ``{"a": [M x [R, in]], "b": [M x [R, out]], ...}``."""
        return slots_lib.init_slots(self.targets, self.num_slots, self.settings.init_std, key, zero_b=self.zero_b)

    def init_extra(self, key: jax.Array) -> Tree:
        """Trainable leaves besides ``slots`` and ``head`` (``{}``: none)."""
        return {}

    def init_alloc(self) -> Tree:
        """The rank record (``committed`` [M, R] bool, ``rank`` [M], ...); ``allocator.init_allocator``'s keys."""
        raise NotImplementedError

    def init_method_state(self, trainable: Tree) -> Tree:
        """The method's own non-trainable state (``{}``: none)."""
        return {}

    # ---------------------------------------------------------------- forward
    def forward_coefs(self, trainable: Tree, alloc: Tree, method_state: Tree, train: bool) -> jax.Array:
        """[M, R] float32 coefficient of each slot row in the joint forward (train) or the evaluated model."""
        raise NotImplementedError

    def live_mask(self, alloc: Tree, method_state: Tree) -> jax.Array:
        """[M, R] bool: slot rows that train this step (the per-slot Adam counts advance on these)."""
        raise NotImplementedError

    def num_live_rows(self, alloc: Tree, method_state: Tree) -> int:
        """Host side: rows of the forward (1 + the highest row live in any module), at least 1."""
        mask = np.asarray(self.live_mask(alloc, method_state)).any(axis=0)
        rows = np.nonzero(mask)[0]
        return int(rows[-1]) + 1 if rows.size else 1

    # ----------------------------------------------------------- loss, update
    def penalty_and_scores(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree
                           ) -> tuple[Tree, jax.Array, Any]:
        """``grads`` with the method's loss terms' gradient added, the terms' value, and the scores its rank
        update reads (from the pre-update parameters and gradients)."""
        return grads, jnp.zeros((), jnp.float32), None

    def optimizer_params(self, tree: Tree) -> Tree:
        """The part of a trainable-shaped tree the shared AdamW trains (default: all of it)."""
        return tree

    def scale_updates(self, updates: Tree, step: jax.Array, lr: jax.Array, method_state: Tree) -> Tree:
        """Per-row learning-rate multipliers on the optimiser's updates, which already carry the shared schedule's
        ``lr`` at 0-based ``step`` (default: none)."""
        return updates

    def after_update(self, trainable: Tree, grads: Tree, alloc: Tree, method_state: Tree, scores: Any,
                     step: jax.Array, key: jax.Array) -> tuple[Tree, Tree, Tree, jax.Array]:
        """The rank rule after the optimiser step (``step`` is the 1-based step just completed).

        Returns ``(trainable, alloc, method_state, changed)``; ``changed`` (bool) refreshes the snapshot.
        """
        return trainable, alloc, method_state, jnp.zeros((), bool)

    def host_update(self, state: Tree, step: int) -> Tree | None:
        """Between steps, on the host: a new train state, or None for no change (default: never)."""
        return None

    def host_update_due(self, step: int) -> bool:
        """Whether ``host_update`` may change anything after completed ``step`` (so the trainer calls it)."""
        return False

    # ----------------------------------------------------------------- export
    def export_factors(self, trainable: Mapping[str, Any], alloc: Mapping[str, Any], method_state: Mapping[str, Any]
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{hf_path: (A [r, in], B [out, r])}``: rows with a nonzero coefficient in the evaluated model, the
        coefficient folded into B as ``coef / scaling`` so the update is ``scaling * B @ A`` (numpy, host side)."""
        coefs = np.asarray(self.forward_coefs(trainable, alloc, method_state, train=False))
        out = {}
        for m, target in enumerate(self.targets):
            rows = np.nonzero(coefs[m])[0]
            a = np.asarray(trainable["slots"]["a"][m])[rows]
            b = np.asarray(trainable["slots"]["b"][m])[rows] * (coefs[m, rows] / self.scaling)[:, None]
            out[target.hf_path] = (a, b.T.copy())
        return out

    # ------------------------------------------------------------- accounting
    # How the method's own paper counts its adapter parameters (``paper_parameters``); a subclass restates it.
    paper_count: ClassVar[str] = "factors: committed rank x (in + out) per module"

    def parameter_counts(self, ranks: Mapping[str, int], head: int = 0,
                         reserves: Mapping[str, int] | None = None) -> dict[str, int]:
        """The common count of the final model's adapter parameters, one number per convention:

        - ``factors``: committed rows x (in + out) per module (what the exported LoRA adapter holds);
        - ``with_extras``: plus the method's own leaves per final rank (``extra_parameters``: lambda, gates);
        - ``with_reserves``: factors and extras of every row that still exists and trains in the trained model,
          committed plus ``reserves`` (rows per module, e.g. a growth method's reserve slot);
        - ``head``: the task head, never in the three above.
        """
        by_path = {t.hf_path: t for t in self.targets}
        reserves = reserves or {}

        def factors_of(rows: Mapping[str, int]) -> int:
            return sum(int(r) * (by_path[p].in_features + by_path[p].out_features) for p, r in rows.items())

        factors = factors_of(ranks)
        rows = {p: int(r) + int(reserves.get(p, 0)) for p, r in ranks.items()}
        return {"factors": factors, "with_extras": factors + int(self.extra_parameters(ranks)),
                "with_reserves": factors_of(rows) + int(self.extra_parameters(rows)), "head": int(head)}

    def extra_parameters(self, ranks: Mapping[str, int]) -> int:
        """Parameters per final rank besides the factors (a singular value or gate per rank: sum of ranks)."""
        return 0

    def reserve_rows(self, alloc: Mapping[str, Any], method_state: Mapping[str, Any]) -> np.ndarray:
        """[M] rows per module that train (``live_mask``) without being committed: the reserves (host side)."""
        live = np.asarray(self.live_mask(alloc, method_state), bool)
        return (live & ~np.asarray(alloc["committed"], bool)).sum(axis=1)

    def paper_parameters(self, counts: Mapping[str, int], trainable: Mapping[str, Any], alloc: Mapping[str, Any],
                         method_state: Mapping[str, Any]) -> int:
        """The count the method's own paper reports (``paper_count`` says how; default: ``factors``)."""
        return int(counts["factors"])

    def accounting(self, trainable: Mapping[str, Any], alloc: Mapping[str, Any],
                   method_state: Mapping[str, Any]) -> dict[str, Any]:
        """``parameter_counts`` of a (host) train state, with ``paper`` (the paper's own count) and how it counts."""
        paths = [t.hf_path for t in self.targets]
        ranks = dict(zip(paths, (int(r) for r in np.asarray(alloc["rank"]))))
        reserves = dict(zip(paths, (int(r) for r in self.reserve_rows(alloc, method_state))))
        head = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(trainable.get("head", {})))
        counts: dict[str, Any] = self.parameter_counts(ranks, head, reserves)
        counts["paper"] = int(self.paper_parameters(counts, trainable, alloc, method_state))
        counts["paper_count"] = self.paper_count
        return counts
