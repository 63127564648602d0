"""``joint``: AdaPaD's allocator with the slots trained jointly (one forward), the like-for-like ablation.

Everything but the gradient is AdaPaD's (``methods/adapad.py``): the same slots, scale ``alpha / r_max``,
importance, growth schedule and budget; the reserve trains in the forward at IncreLoRA's ``E = 1e-5``
(``adapad.single_forward_weights``). A difference between ``adapad`` and ``joint`` in a results table is the
deflation and nothing else.
"""

from __future__ import annotations

from adapad_jax.methods.adapad import AllocatorMethod


class Joint(AllocatorMethod):
    name = "joint"
