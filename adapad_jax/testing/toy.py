"""A tiny model that honours the ``LoadedModel`` contract, and a planted low-rank teacher task.

Model: frozen token embedding -> masked mean pool -> ``num_layers`` residual MLP blocks whose two
linear layers (``fc_in`` h->2h, ``fc_out`` 2h->h) are ``AdaptedDense`` -> trainable ``head``.
HF-style paths ``toy.layers.{i}.fc_in`` / ``toy.layers.{i}.fc_out``.

Planted task: the teacher is the same network with ``kernel += U V^T`` of a chosen rank in some
modules; regression labels are the teacher's outputs on random token sequences.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adapad_jax.adapters.layer import AdaptedDense
from adapad_jax.models.base import AdapterTarget, LoadedModel

MODULE_TYPES = ("fc_in", "fc_out")


class ToyBlock(nn.Module):
    """Residual MLP block with two adapted linear layers."""

    hidden: int
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = AdaptedDense(2 * self.hidden, name="fc_in", adapter_dropout=self.adapter_dropout,
                         kernel_init=nn.initializers.normal(1.0 / np.sqrt(self.hidden)))(x, deterministic)
        h = nn.gelu(h)
        h = AdaptedDense(self.hidden, name="fc_out", adapter_dropout=self.adapter_dropout,
                         kernel_init=nn.initializers.normal(1.0 / np.sqrt(2 * self.hidden)))(h, deterministic)
        return x + h


class ToyModel(nn.Module):
    """Embedding, mean pool, then adapted linear layers and a head.

    ``layout="residual"``: ``num_layers`` residual MLP blocks (``fc_in`` h->2h, gelu, ``fc_out`` 2h->h), then a
    dense head. ``layout="branches"``: every adapted layer (h->h, named like the residual ones) reads the pooled
    input on its own branch; the outputs are concatenated through gelu and a per-output affine head, so an
    error planted in one module can only be fixed by that module (used by the planted-rank test).
    ``layout="linear_branches"``: the same without the gelu, so the model is linear in every adapter delta.
    """

    vocab_size: int
    hidden: int
    num_layers: int
    num_outputs: int
    adapter_dropout: float = 0.0
    layout: str = "residual"
    remat: bool = False  # recompute each residual block in the backward pass

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        emb = nn.Embed(self.vocab_size, self.hidden, name="embed", embedding_init=nn.initializers.normal(1.0))(input_ids)
        mask = attention_mask.astype(jnp.float32)[..., None]
        x = (emb * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        if self.layout in ("branches", "linear_branches"):
            activation = nn.gelu if self.layout == "branches" else (lambda v: v)
            outs = []
            for i in range(self.num_layers):
                for name in MODULE_TYPES:
                    layer = AdaptedDense(self.hidden, name=f"{name}_{i}", adapter_dropout=self.adapter_dropout,
                                         kernel_init=nn.initializers.normal(1.0 / np.sqrt(self.hidden)))
                    outs.append(activation(layer(x, deterministic)))
            y = jnp.concatenate(outs, axis=-1)
            scale = self.param("scale", nn.initializers.ones, (y.shape[-1],))
            bias = self.param("bias", nn.initializers.zeros, (y.shape[-1],))
            return {"logits": y * scale + bias}
        block_cls = nn.remat(ToyBlock, static_argnums=(2,)) if self.remat else ToyBlock
        for i in range(self.num_layers):
            x = block_cls(self.hidden, self.adapter_dropout, name=f"layers_{i}")(x, deterministic)
        return {"logits": nn.Dense(self.num_outputs, name="head")(x)}


def make_toy_model(
    hidden: int = 32, num_layers: int = 2, vocab_size: int = 64, num_outputs: int = 8, task: str = "regression",
    adapter_dropout: float = 0.0, seed: int = 0, layout: str = "residual",
) -> LoadedModel:
    """A randomly initialised toy ``LoadedModel`` (task ``regression`` or ``classification``)."""
    if layout not in ("residual", "branches", "linear_branches"):
        raise ValueError(f"layout must be 'residual', 'branches' or 'linear_branches', got {layout!r}")
    module = ToyModel(vocab_size, hidden, num_layers, num_outputs, adapter_dropout, layout)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = module.init(jax.random.PRNGKey(seed), ids, jnp.ones_like(ids))["params"]
    targets = []
    for i in range(num_layers):
        for name, (fan_in, fan_out) in zip(MODULE_TYPES, ((hidden, 2 * hidden), (2 * hidden, hidden))):
            if layout != "residual":
                targets.append(AdapterTarget(f"toy.layers.{i}.{name}", (f"{name}_{i}",), hidden, hidden))
            else:
                targets.append(AdapterTarget(f"toy.layers.{i}.{name}", (f"layers_{i}", name), fan_in, fan_out))
    return LoadedModel(
        family="toy",
        exports_to_peft=False,
        task=task,
        module=module,
        params=jax.tree.map(np.asarray, params),
        hf_config=None,
        targets=targets,
        head_prefixes=[("head",)] if layout == "residual" else [("scale",), ("bias",)],
        modules_to_save=["head"],
        to_hf_state_dict=lambda p: {},
        hf_architecture="ToyModel",
    )


def planted_teacher(model: LoadedModel, planted_ranks: Sequence[int], scale: float = 1.0, seed: int = 1) -> dict[str, Any]:
    """Teacher params: the model's params with a rank-r_m delta ``U V^T`` added to module m's kernel."""
    if len(planted_ranks) != len(model.targets):
        raise ValueError(f"planted_ranks has {len(planted_ranks)} entries for {len(model.targets)} modules")
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.array, model.params)
    for target, rank in zip(model.targets, planted_ranks):
        if rank == 0:
            continue
        u = rng.normal(size=(target.in_features, rank)) / np.sqrt(target.in_features)
        v = rng.normal(size=(rank, target.out_features))
        node = params
        for name in target.flax_path:
            node = node[name]
        node["kernel"] = (node["kernel"] + scale * u @ v).astype(np.float32)
    return params


def toy_batch(
    model: LoadedModel, teacher_params: dict[str, Any], index: int, batch_size: int, seq_len: int = 8, seed: int = 0
) -> dict[str, np.ndarray]:
    """Batch number ``index`` of the planted task: random tokens, teacher outputs as labels (deterministic)."""
    rng = np.random.default_rng([seed, index])
    vocab = model.module.vocab_size
    input_ids = rng.integers(0, vocab, size=(batch_size, seq_len)).astype(np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=(batch_size,))
    attention_mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    outputs = model.module.apply({"params": teacher_params}, input_ids, attention_mask)["logits"]
    if model.task == "classification":
        labels = np.asarray(outputs).argmax(-1).astype(np.int32)
    else:
        labels = np.asarray(outputs, np.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_weight": np.ones((batch_size,), np.float32),
    }


class ToyBatches:
    """A resumable iterator over planted-task batches; ``state()`` / ``start`` give its position."""

    def __init__(self, model: LoadedModel, teacher_params: dict[str, Any], batch_size: int, seq_len: int = 8,
                 seed: int = 0, start: int = 0):
        self.model, self.teacher, self.batch_size, self.seq_len, self.seed = model, teacher_params, batch_size, seq_len, seed
        self.position = start

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = toy_batch(self.model, self.teacher, self.position, self.batch_size, self.seq_len, self.seed)
        self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        """JSON-able position."""
        return {"position": self.position}


# Where the toy runs differ from base_config(): a small model, short growth intervals, a large learning rate.
TOY_DEFAULTS = {
    "task": "demo", "model.name_or_path": "toy",
    "adapter.r_max": 4, "adapter.rank_budget": 8, "adapter.alpha": 8.0, "adapter.top_k": 2,
    "adapter.growth_interval": 5, "adapter.slot_chunk_size": 0,
    "optim.learning_rate": 1e-2, "optim.warmup_steps": 2,
    "train.batch_size": 16, "train.log_every_steps": 1,
}


def toy_config(**overrides: Any) -> ml_collections.ConfigDict:
    """``base_config()`` with ``TOY_DEFAULTS`` and ``overrides`` applied, for tests and benchmarks.

    Keys in ``overrides`` are dotted paths, e.g. ``toy_config(**{"adapter.r_max": 4})``.
    """
    from adapad_jax.config.schema import base_config

    config = base_config()
    for dotted, value in {**TOY_DEFAULTS, **overrides}.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache for every program (default dir under the temp dir); returns it.

    Tests and benchmarks build many small trainers whose programs repeat across processes; the
    cache turns each repeat compile (seconds on 2 CPU cores) into a file read.
    """
    import os
    import tempfile

    from adapad_jax.runtime.compilation_cache import enable_persistent_cache

    directory = directory or os.path.join(tempfile.gettempdir(), "adapad_jax_compilation_cache")
    enable_persistent_cache(directory, every_program=True)
    return directory
