"""``adapter.method`` -> its ``Method`` class; the names are ``config.schema.METHODS`` (checked by the tests)."""

from __future__ import annotations

from typing import Any, Sequence

from adapad_jax.adapters.target import AdapterTarget
from adapad_jax.config.validation import check_method
from adapad_jax.methods.adalora import AdaLoRA
from adapad_jax.methods.adapad import AdaPaD
from adapad_jax.methods.ardlora import ARDLoRA
from adapad_jax.methods.base import Method
from adapad_jax.methods.increlora import IncreLoRA
from adapad_jax.methods.joint import Joint
from adapad_jax.methods.lora import LoRA
from adapad_jax.methods.sora import SoRA

METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (AdaPaD, Joint, LoRA, AdaLoRA, IncreLoRA, SoRA, ARDLoRA)
}


def build_method(settings: Any, targets: Sequence[AdapterTarget], components: int = 1) -> Method:
    """The method ``settings.method`` names, set up for ``targets`` on a mesh with ``components`` devices."""
    check_method(settings.method)
    return METHOD_CLASSES[settings.method](settings, targets, components)
