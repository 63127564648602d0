"""``lora``: fixed-rank LoRA (Hu et al. 2021), ``adapter.lora_rank`` in every module, ``B = 0`` at init.

Scale ``alpha / lora_rank``; no slot axis of its own (``config.validation.has_slot_axis``): its rows are the
rank, the allocator never grows it, and there is no reserve.
"""

from __future__ import annotations

from typing import Any

from adapad_jax.config.validation import check_lora_rank
from adapad_jax.methods.adapad import AllocatorMethod
from adapad_jax.methods.base import MethodSetup


class LoRA(AllocatorMethod):
    name = "lora"
    zero_b = True

    def make_setup(self, settings: Any, num_modules: int, components: int) -> MethodSetup:
        check_lora_rank(settings.lora_rank)
        rank = settings.lora_rank
        return MethodSetup(num_modules, rank, float(settings.alpha) / rank, rank, num_modules * rank, False, False)
