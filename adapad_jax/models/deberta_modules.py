"""DeBERTaV3 (HF model type ``deberta-v2``) in flax.linen, numerically as transformers' PyTorch model.

Module and parameter names mirror the transformers module tree (``deberta/encoder/layer_0/attention/self/
query_proj``...), so the weight mapping in ``deberta.py`` is a renaming plus a kernel transpose. Every linear
layer inside the encoder layers is an ``AdaptedDense`` and can carry adapter slots from the ``lora`` collection.
Over 400 lines because the module tree is one unit (disentangled attention and its relative-position helpers are
shared by every layer); splitting it would split the names the weight mapping mirrors.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.adapters.layer import AdaptedDense


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers ACT2FN names -> jax functions with the same formula.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_python": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_accurate": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The jax function for a transformers activation name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation '{name}' is not supported (supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class DebertaSpec:
    """The architecture fields of a DebertaV2Config, resolved the way transformers resolves them."""

    vocab_size: int
    hidden_size: int
    embedding_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    position_biased_input: bool
    type_vocab_size: int
    relative_attention: bool
    position_buckets: int
    max_relative_positions: int
    pos_att_type: tuple[str, ...]
    share_att_key: bool
    norm_rel_ebd: bool
    hidden_dropout: float
    attention_dropout: float
    pooler_hidden_size: int
    pooler_hidden_act: str
    pooler_dropout: float
    classifier_dropout: float
    initializer_range: float

    @property
    def pos_ebd_size(self) -> int:
        """Half the number of relative-position embedding rows (transformers' ``att_span``)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def all_head_size(self) -> int:
        return self.num_heads * self.head_dim


def parse_pos_att_type(value: Any) -> tuple[str, ...]:
    """``"p2c|c2p"`` (old config.json style) or a list -> a tuple of lower-case attention types."""
    if value is None:
        return ()
    items = value.split("|") if isinstance(value, str) else list(value)
    parsed = tuple(str(x).strip().lower() for x in items if str(x).strip())
    unknown = [x for x in parsed if x not in ("c2p", "p2c")]
    if unknown:
        raise ValueError(f"pos_att_type has unknown entries {unknown} (allowed: 'c2p', 'p2c')")
    return parsed


def spec_from_config(config: Any, classifier_dropout: float | None = None) -> DebertaSpec:
    """Read a transformers DebertaV2Config (or any object with its fields) into a DebertaSpec."""
    get = partial(getattr, config)
    if get("conv_kernel_size", 0) > 0:
        raise ValueError("DeBERTa-v2 configs with conv_kernel_size > 0 (the v2 xlarge conv layer) are not supported")
    hidden = int(config.hidden_size)
    if hidden % int(config.num_attention_heads) != 0:
        raise ValueError(
            f"hidden_size {hidden} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )
    max_rel = int(get("max_relative_positions", -1))
    if max_rel < 1:
        max_rel = int(config.max_position_embeddings)
    norm_rel = [x.strip() for x in str(get("norm_rel_ebd", "none")).lower().split("|")]
    cls_dropout = classifier_dropout
    if cls_dropout is None:
        cls_dropout = get("cls_dropout", None)
    if cls_dropout is None:
        cls_dropout = config.hidden_dropout_prob
    return DebertaSpec(
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        embedding_size=int(get("embedding_size", None) or hidden),
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        head_dim=int(get("attention_head_size", None) or hidden // int(config.num_attention_heads)),
        intermediate_size=int(config.intermediate_size),
        hidden_act=str(config.hidden_act),
        layer_norm_eps=float(config.layer_norm_eps),
        max_position_embeddings=int(config.max_position_embeddings),
        position_biased_input=bool(get("position_biased_input", True)),
        type_vocab_size=int(config.type_vocab_size),
        relative_attention=bool(get("relative_attention", False)),
        position_buckets=int(get("position_buckets", -1)),
        max_relative_positions=max_rel,
        pos_att_type=parse_pos_att_type(get("pos_att_type", None)),
        share_att_key=bool(get("share_att_key", False)),
        norm_rel_ebd="layer_norm" in norm_rel,
        hidden_dropout=float(config.hidden_dropout_prob),
        attention_dropout=float(config.attention_probs_dropout_prob),
        pooler_hidden_size=int(get("pooler_hidden_size", None) or hidden),
        pooler_hidden_act=str(get("pooler_hidden_act", "gelu")),
        pooler_dropout=float(get("pooler_dropout", 0.0)),
        classifier_dropout=float(cls_dropout),
        initializer_range=float(get("initializer_range", 0.02) or 0.02),
    )


def log_bucket_position(relative_pos: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' ``make_log_bucket_position`` in float32 numpy (positions are static at trace time)."""
    rel = relative_pos.astype(np.int64)
    sign = np.sign(rel)
    mid = bucket_size // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
    log_pos = (
        np.ceil(
            np.log(abs_pos / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)
        )
        + np.float32(mid)
    )
    bucket_pos = np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign)
    return bucket_pos.astype(np.int64)


def relative_positions(seq_len: int, bucket_size: int, max_position: int) -> np.ndarray:
    """[S, S] relative positions q - k, log-bucketed when both sizes are positive (``build_relative_position``)."""
    ids = np.arange(seq_len, dtype=np.int64)
    rel = ids[:, None] - ids[None, :]
    if bucket_size > 0 and max_position > 0:
        rel = log_bucket_position(rel, bucket_size, max_position)
    return rel


class EmbeddingTable(nn.Module):
    """A bare embedding matrix (``rel_embeddings``), returned whole."""

    num_embeddings: int
    features: int
    stddev: float

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.initializers.normal(self.stddev), (self.num_embeddings, self.features))


def _layer_norm(spec: DebertaSpec, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=spec.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class DebertaEmbeddings(nn.Module):
    """Word (+ position, + token type) embeddings, optional projection, LayerNorm, padding mask."""

    spec: DebertaSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, mask, deterministic: bool) -> jax.Array:
        spec = self.spec
        init = nn.initializers.normal(spec.initializer_range)
        embed = partial(nn.Embed, features=spec.embedding_size, dtype=self.dtype, embedding_init=init)
        x = embed(spec.vocab_size, name="word_embeddings")(input_ids)
        if spec.position_biased_input:
            seq_len = input_ids.shape[1]
            if seq_len > spec.max_position_embeddings:
                raise ValueError(
                    f"sequence length {seq_len} exceeds max_position_embeddings {spec.max_position_embeddings}"
                )
            x = x + embed(spec.max_position_embeddings, name="position_embeddings")(jnp.arange(seq_len)[None, :])
        if spec.type_vocab_size > 0:
            x = x + embed(spec.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        if spec.embedding_size != spec.hidden_size:
            x = nn.Dense(spec.hidden_size, use_bias=False, dtype=self.dtype, kernel_init=init, name="embed_proj")(x)
        x = _layer_norm(spec, self.dtype, "LayerNorm")(x)
        x = x * mask[:, :, None].astype(x.dtype)
        return nn.Dropout(spec.hidden_dropout)(x, deterministic=deterministic)


def relative_gather(x: jax.Array, index: np.ndarray) -> jax.Array:
    """``take_along_axis(x, index, -1)`` for x [..., Q, R] and a static index [Q, K] (``R`` >= used columns).

    When ``index[q, k] = c + q - k`` (or ``c - q + k``) everywhere, as for relative positions inside the
    bucket range, the gather is a skew: reshape, slice, reshape, whose backward is a pad rather than the
    scatter-add a gather's backward is (the slowest part of DeBERTa's backward on a CPU). Otherwise a gather.
    """
    index = np.asarray(index)
    rows, cols = index.shape
    qs, ks = np.arange(rows)[:, None], np.arange(cols)[None, :]
    width = x.shape[-1]
    lead = x.shape[:-2]
    for sign in (1, -1) if width > 1 else ():
        c = int(index[0, 0])
        if not np.array_equal(index, c + sign * (qs - ks)):
            continue
        if sign == 1:  # x[q, c + q - k] = reversed(x)[q, (width - 1 - c) - q + k]
            x, offset = x[..., ::-1], width - 1 - c
        else:
            offset = c
        # reversed/plain x[q, offset - q + k] sits at flat position q * (width - 1) + offset + k
        flat = x.reshape(lead + (rows * width,))
        end = offset + rows * (width - 1)
        if end > rows * width:
            flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, end - rows * width)])
        return flat[..., offset:end].reshape(lead + (rows, width - 1))[..., :cols]
    return jnp.take_along_axis(x, jnp.asarray(index).reshape((1,) * len(lead) + index.shape), axis=-1)


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[..., S, H*d] -> [..., H, S, d]."""
    x = x.reshape(x.shape[:-1] + (num_heads, -1))
    return jnp.swapaxes(x, -2, -3)


class DisentangledSelfAttention(nn.Module):
    """Content-content plus c2p / p2c position attention, as transformers' DisentangledSelfAttention."""

    spec: DebertaSpec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    def _dense(self, name: str) -> AdaptedDense:
        return AdaptedDense(
            self.spec.all_head_size,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.spec.initializer_range),
            adapter_dropout=self.adapter_dropout,
            name=name,
        )

    @nn.compact
    def __call__(self, hidden, mask2d, relative_pos, rel_embeddings, deterministic: bool) -> jax.Array:
        spec = self.spec
        heads = spec.num_heads
        query_proj, key_proj = self._dense("query_proj"), self._dense("key_proj")
        q = _split_heads(query_proj(hidden, deterministic), heads)  # [B, H, S, d]
        k = _split_heads(key_proj(hidden, deterministic), heads)
        v = _split_heads(self._dense("value_proj")(hidden, deterministic), heads)

        scale_factor = 1 + ("c2p" in spec.pos_att_type) + ("p2c" in spec.pos_att_type)
        scale = jnp.asarray(math.sqrt(spec.head_dim * scale_factor), jnp.float32).astype(self.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k / scale)

        if spec.relative_attention:
            rel = nn.Dropout(spec.hidden_dropout)(rel_embeddings, deterministic=deterministic)
            span = spec.pos_ebd_size
            rel = rel[: 2 * span]
            if spec.share_att_key:
                pos_query = _split_heads(query_proj(rel, deterministic), heads)  # [H, 2span, d]
                pos_key = _split_heads(key_proj(rel, deterministic), heads)
            else:
                if "c2p" in spec.pos_att_type:
                    pos_key = _split_heads(self._dense("pos_key_proj")(rel, deterministic), heads)
                if "p2c" in spec.pos_att_type:
                    pos_query = _split_heads(self._dense("pos_query_proj")(rel, deterministic), heads)
            # Positions are static: recomputed here from the length, so they stay numpy under nn.remat too. Only
            # the rows of the position tables that some (q, k) pair reads are projected against q / k.
            relative_pos = relative_positions(hidden.shape[-2], spec.position_buckets, spec.max_relative_positions)
            if "c2p" in spec.pos_att_type:
                index = np.clip(relative_pos + span, 0, 2 * span - 1)
                lo, hi = int(index.min()), int(index.max()) + 1
                c2p = jnp.einsum("bhqd,hrd->bhqr", q, pos_key[:, lo:hi])
                scores = scores + relative_gather(c2p, index - lo) / scale
            if "p2c" in spec.pos_att_type:
                index = np.clip(-relative_pos + span, 0, 2 * span - 1)
                lo, hi = int(index.min()), int(index.max()) + 1
                p2c = jnp.einsum("bhkd,hrd->bhkr", k, pos_query[:, lo:hi])
                scores = scores + jnp.swapaxes(relative_gather(p2c, index - lo), -1, -2) / scale

        scores = jnp.where(mask2d, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(spec.attention_dropout)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        context = jnp.swapaxes(context, 1, 2)
        return context.reshape(context.shape[:2] + (-1,))


class DenseLayerNorm(nn.Module):
    """``dense -> dropout -> LayerNorm(x + residual)`` (transformers' SelfOutput / Output)."""

    spec: DebertaSpec
    features: int
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, residual, deterministic: bool) -> jax.Array:
        x = AdaptedDense(
            self.features,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.spec.initializer_range),
            adapter_dropout=self.adapter_dropout,
            name="dense",
        )(x, deterministic)
        x = nn.Dropout(self.spec.hidden_dropout)(x, deterministic=deterministic)
        return _layer_norm(self.spec, self.dtype, "LayerNorm")(x + residual)


class Intermediate(nn.Module):
    """``dense -> activation``."""

    spec: DebertaSpec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool) -> jax.Array:
        x = AdaptedDense(
            self.spec.intermediate_size,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.spec.initializer_range),
            adapter_dropout=self.adapter_dropout,
            name="dense",
        )(x, deterministic)
        return activation(self.spec.hidden_act)(x)


class Attention(nn.Module):
    """``self`` (disentangled attention) followed by ``output`` (dense + residual LayerNorm)."""

    spec: DebertaSpec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, hidden, mask2d, relative_pos, rel_embeddings, deterministic: bool) -> jax.Array:
        context = DisentangledSelfAttention(self.spec, self.dtype, self.adapter_dropout, name="self")(
            hidden, mask2d, relative_pos, rel_embeddings, deterministic
        )
        return DenseLayerNorm(self.spec, self.spec.hidden_size, self.dtype, self.adapter_dropout, name="output")(
            context, hidden, deterministic
        )


class Layer(nn.Module):
    """One encoder layer: attention, intermediate, output."""

    spec: DebertaSpec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, hidden, mask2d, relative_pos, rel_embeddings, deterministic: bool) -> jax.Array:
        attention = Attention(self.spec, self.dtype, self.adapter_dropout, name="attention")(
            hidden, mask2d, relative_pos, rel_embeddings, deterministic
        )
        inner = Intermediate(self.spec, self.dtype, self.adapter_dropout, name="intermediate")(attention, deterministic)
        return DenseLayerNorm(self.spec, self.spec.hidden_size, self.dtype, self.adapter_dropout, name="output")(
            inner, attention, deterministic
        )


class Encoder(nn.Module):
    """The stack of layers with the shared relative-position embeddings."""

    spec: DebertaSpec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0
    remat: bool = False  # recompute each layer in the backward pass (activation memory of one layer, not all)

    @nn.compact
    def __call__(self, hidden, mask, deterministic: bool) -> jax.Array:
        spec = self.spec
        seq_len = hidden.shape[1]
        mask2d = (mask[:, None, :, None] * mask[:, None, None, :]).astype(bool)
        relative_pos, rel_embeddings = None, None
        if spec.relative_attention:
            relative_pos = relative_positions(seq_len, spec.position_buckets, spec.max_relative_positions)
            rel_embeddings = EmbeddingTable(
                2 * spec.pos_ebd_size, spec.hidden_size, spec.initializer_range, name="rel_embeddings"
            )()
            if spec.norm_rel_ebd:
                rel_embeddings = _layer_norm(spec, self.dtype, "LayerNorm")(rel_embeddings)
            rel_embeddings = rel_embeddings.astype(self.dtype)
        elif spec.norm_rel_ebd:
            # transformers keeps an (unused) encoder.LayerNorm in this case; call it once so its weights exist.
            _layer_norm(spec, self.dtype, "LayerNorm")(jnp.zeros((1, spec.hidden_size), self.dtype))
        # static_argnums counts `self`: (hidden, mask2d, relative_pos, rel_embeddings, deterministic) -> 5.
        layer_cls = nn.remat(Layer, static_argnums=(5,)) if self.remat else Layer
        for i in range(spec.num_layers):
            hidden = layer_cls(spec, self.dtype, self.adapter_dropout, name=f"layer_{i}")(
                hidden, mask2d, relative_pos, rel_embeddings, deterministic
            )
        return hidden


class DebertaModel(nn.Module):
    """The backbone (transformers' DebertaV2Model): embeddings + encoder -> last hidden state."""

    spec: DebertaSpec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, deterministic: bool) -> jax.Array:
        hidden = DebertaEmbeddings(self.spec, self.dtype, name="embeddings")(
            input_ids, token_type_ids, attention_mask, deterministic
        )
        return Encoder(self.spec, self.dtype, self.adapter_dropout, self.remat, name="encoder")(
            hidden, attention_mask, deterministic
        )


class DebertaForTask(nn.Module):
    """Backbone ``deberta`` plus the head of ``task``: ContextPooler + classifier, or ``qa_outputs``."""

    spec: DebertaSpec
    task: str
    num_labels: int
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0
    remat: bool = False  # layer-wise rematerialisation (see Encoder)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        spec = self.spec
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        hidden = DebertaModel(spec, self.dtype, self.adapter_dropout, self.remat, name="deberta")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        init = nn.initializers.normal(spec.initializer_range)
        if self.task == "qa":
            logits = nn.Dense(2, dtype=self.dtype, kernel_init=init, name="qa_outputs")(hidden).astype(jnp.float32)
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        context = nn.Dropout(spec.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
        pooled = _Pooler(spec, self.dtype, name="pooler")(context)
        pooled = nn.Dropout(spec.classifier_dropout)(pooled, deterministic=deterministic)
        logits = nn.Dense(self.num_labels, dtype=self.dtype, kernel_init=init, name="classifier")(pooled)
        return {"logits": logits.astype(jnp.float32)}


class _Pooler(nn.Module):
    """transformers' ContextPooler after its dropout: ``dense`` then the pooler activation."""

    spec: DebertaSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        dense = nn.Dense(
            self.spec.pooler_hidden_size,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.spec.initializer_range),
            name="dense",
        )
        return activation(self.spec.pooler_hidden_act)(dense(context))
