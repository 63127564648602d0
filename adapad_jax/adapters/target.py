"""Where one adapted linear layer sits: the contract between a model family and the adapter slots."""

from __future__ import annotations

import dataclasses

FlaxPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AdapterTarget:
    """One adapted linear layer: where it sits in PyTorch and in the Flax tree, and its shape."""

    hf_path: str  # full module path in the transformers model, e.g. "deberta.encoder.layer.0.attention.self.query_proj"
    flax_path: FlaxPath  # path of the AdaptedDense module in the params tree (without "kernel")
    in_features: int
    out_features: int
