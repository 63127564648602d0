"""Qwen3 (transformers 5.x semantics) in flax.linen: the static spec read from a config, RoPE, and the modules.

The module tree mirrors the transformers names so the weight mapping stays one line per tensor:
``model/embed_tokens``, ``model/layers_{i}/{self_attn,mlp,input_layernorm,post_attention_layernorm}``,
``model/norm`` and the task head (``lm_head`` when untied, ``score`` or ``qa_outputs``). Every linear layer of a
block is an :class:`~adapad_jax.adapters.AdaptedDense`, so the ``lora`` collection reaches any of them.
Over 400 lines because the module tree is one unit: splitting it would split the names the weight mapping mirrors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.adapters.layer import AdaptedDense

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Every linear layer of a Qwen3 block -> the submodule that holds it (as in transformers).
PROJECTION_PARENT = {**{n: "self_attn" for n in ATTENTION_PROJECTIONS}, **{n: "mlp" for n in MLP_PROJECTIONS}}
DEFAULT_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

# RoPE types whose frequencies do not depend on the sequence length at run time.
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class Qwen3ConfigError(ValueError):
    """A Qwen3 config this port cannot reproduce; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Qwen3Spec:
    """The static (hashable) architecture facts the Flax modules need, read from a transformers Qwen3Config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool
    attention_dropout: float
    hidden_act: str
    tie_word_embeddings: bool
    pad_token_id: int | None
    initializer_range: float
    layer_windows: tuple[int | None, ...]  # sliding window per layer, None = full causal attention
    rope_inv_freq: tuple[float, ...]  # [head_dim // 2] inverse frequencies (fp32 values)
    rope_attention_scaling: float  # factor on cos/sin (1.0 except yarn / longrope style types)
    # "einsum": scores, mask, softmax, weights written out; "dot_product": jax.nn.dot_product_attention (cuDNN
    # flash attention on a GPU where it applies, XLA elsewhere); "auto" = dot_product, which is also the faster
    # on a CPU (Qwen3-0.6B forward+backward at 4 x 128 on one core: 12.0 s against 13.8 s for einsum).
    # Attention dropout in training always takes the einsum path (dot_product_attention has no dropout).
    attention_impl: str = "auto"


def rope_frequencies(hf_config: Any, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse RoPE frequencies [head_dim // 2] (float32) and the cos/sin scaling, as transformers computes them."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4.x configs: rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
        raise Qwen3ConfigError(
            f"rope_parameters per layer type ({', '.join(params)}) are not supported for Qwen3; "
            "give one rope_parameters dict"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise Qwen3ConfigError(
            f"rope_type '{rope_type}' is not supported (supported: {', '.join(STATIC_ROPE_TYPES)}); "
            "'dynamic' and 'longrope' change the frequencies with the sequence length at run time"
        )
    if rope_type == "default":
        theta = float(params["rope_theta"])
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = (1.0 / (theta ** exponents.astype(np.float64))).astype(np.float32)
        return inv_freq, 1.0
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError as err:
        raise Qwen3ConfigError(f"rope_type '{rope_type}' needs torch to compute its frequencies ({err})") from None
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)
    return inv_freq.detach().cpu().float().numpy(), float(attention_scaling)


def spec_from_hf_config(hf_config: Any) -> Qwen3Spec:
    """Read and check the fields of a transformers Qwen3Config; raise Qwen3ConfigError for what is not supported."""
    if getattr(hf_config, "model_type", None) != "qwen3":
        found = getattr(hf_config, "model_type", None)
        raise Qwen3ConfigError(f"expected a config with model_type 'qwen3', got '{found}'")
    num_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    if num_heads % num_kv_heads:
        raise Qwen3ConfigError(
            f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads)
    if head_dim % 2:
        raise Qwen3ConfigError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    hidden_act = str(getattr(hf_config, "hidden_act", "silu"))
    if hidden_act not in _ACTIVATIONS:
        raise Qwen3ConfigError(f"hidden_act '{hidden_act}' is not supported (supported: {', '.join(_ACTIVATIONS)})")
    num_layers = int(hf_config.num_hidden_layers)
    layer_types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * num_layers)
    if len(layer_types) < num_layers:
        raise Qwen3ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    windows: list[int | None] = []
    for i, layer_type in enumerate(layer_types[:num_layers]):
        if layer_type == "full_attention":
            windows.append(None)
        elif layer_type == "sliding_attention":
            window = getattr(hf_config, "sliding_window", None)
            if not window:
                raise Qwen3ConfigError(f"layer {i} is 'sliding_attention' but the config has no sliding_window")
            windows.append(int(window))
        else:
            raise Qwen3ConfigError(
                f"layer_types[{i}] = '{layer_type}' is not supported (supported: full_attention, sliding_attention)"
            )
    inv_freq, attention_scaling = rope_frequencies(hf_config, head_dim)
    if inv_freq.shape != (head_dim // 2,):
        raise Qwen3ConfigError(f"RoPE gives {inv_freq.shape[0]} frequencies, expected head_dim / 2 = {head_dim // 2}")
    pad_token_id = getattr(hf_config, "pad_token_id", None)
    return Qwen3Spec(
        vocab_size=int(hf_config.vocab_size),
        hidden_size=int(hf_config.hidden_size),
        intermediate_size=int(hf_config.intermediate_size),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        hidden_act=hidden_act,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        pad_token_id=None if pad_token_id is None else int(pad_token_id),
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02) or 0.02),
        layer_windows=tuple(windows),
        rope_inv_freq=tuple(float(f) for f in inv_freq),
        rope_attention_scaling=attention_scaling,
    )


class Qwen3RMSNorm(nn.Module):
    """RMSNorm as transformers: normalise in fp32, cast back, then scale by ``weight``."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` (transformers' form), computed on the two halves of the last axis.

    ``cos`` / ``sin`` [S, d] repeat their first half (``rotary_cos_sin``), so each output half needs only one
    half of each: one pass over ``x`` and a concatenation, instead of materialising ``rotate_half(x)``.
    """
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos_h, sin_h = cos[None, :, None, :half], sin[None, :, None, :half]
    return jnp.concatenate([first * cos_h - second * sin_h, second * cos_h + first * sin_h], axis=-1)


def rotary_cos_sin(spec: Qwen3Spec, seq_len: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [S, head_dim] for positions 0..S-1 (transformers uses arange positions, padding included)."""
    inv_freq = jnp.asarray(spec.rope_inv_freq, dtype=jnp.float32)
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    scale = spec.rope_attention_scaling
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def attention_allowed(attention_mask: jax.Array, window: int | None) -> jax.Array:
    """Boolean [B, 1, 1, S, S] (query, key): causal, key not padding, and inside the sliding window if any."""
    seq_len = attention_mask.shape[-1]
    q_idx = jnp.arange(seq_len)[:, None]
    kv_idx = jnp.arange(seq_len)[None, :]
    allowed = kv_idx <= q_idx
    if window is not None:
        allowed = allowed & (kv_idx > q_idx - window)
    key_valid = attention_mask.astype(bool)[:, None, None, None, :]
    return allowed[None, None, None] & key_valid


ATTENTION_IMPLS = ("auto", "einsum", "dot_product")


def _use_dot_product(spec: Qwen3Spec, deterministic: bool) -> bool:
    if spec.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {spec.attention_impl!r}")
    if spec.attention_dropout > 0.0 and not deterministic:
        return False
    return spec.attention_impl in ("dot_product", "auto")


def with_attention_impl(module: nn.Module, impl: str) -> nn.Module:
    """A copy of a Qwen3 module (any with a ``spec`` field) whose attention uses ``impl`` (see ``Qwen3Spec``)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return module.clone(spec=dataclasses.replace(module.spec, attention_impl=impl))


class Qwen3Attention(nn.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm and rotary embeddings."""

    spec: Qwen3Spec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    def _proj(self, name: str, features: int) -> AdaptedDense:
        return AdaptedDense(
            features=features,
            use_bias=self.spec.attention_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.spec.initializer_range),
            adapter_dropout=self.adapter_dropout,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        spec = self.spec
        batch, seq_len, _ = x.shape
        groups = spec.num_heads // spec.num_kv_heads
        q = self._proj("q_proj", spec.num_heads * spec.head_dim)(x, deterministic)
        k = self._proj("k_proj", spec.num_kv_heads * spec.head_dim)(x, deterministic)
        v = self._proj("v_proj", spec.num_kv_heads * spec.head_dim)(x, deterministic)
        q = Qwen3RMSNorm(spec.rms_norm_eps, self.dtype, name="q_norm")(q.reshape(batch, seq_len, -1, spec.head_dim))
        k = Qwen3RMSNorm(spec.rms_norm_eps, self.dtype, name="k_norm")(k.reshape(batch, seq_len, -1, spec.head_dim))
        v = v.reshape(batch, seq_len, spec.num_kv_heads, spec.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if _use_dot_product(spec, deterministic):
            # [B, S, N, d] queries against [B, S, K, d] keys/values: query head h reads kv head h // groups.
            out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, :, 0], scale=spec.head_dim**-0.5)
            out = out.reshape(batch, seq_len, spec.num_heads * spec.head_dim)
            return self._proj("o_proj", spec.hidden_size)(out, deterministic)
        # Query head h uses key/value head h // groups (transformers' repeat_kv order).
        q = q.reshape(batch, seq_len, spec.num_kv_heads, groups, spec.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * jnp.asarray(spec.head_dim**-0.5, self.dtype)
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        if spec.attention_dropout > 0.0:
            weights = nn.Dropout(rate=spec.attention_dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(batch, seq_len, spec.num_heads * spec.head_dim)
        return self._proj("o_proj", spec.hidden_size)(out, deterministic)


class Qwen3MLP(nn.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)), no biases."""

    spec: Qwen3Spec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        def proj(name: str, features: int) -> AdaptedDense:
            return AdaptedDense(
                features=features,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(self.spec.initializer_range),
                adapter_dropout=self.adapter_dropout,
                name=name,
            )

        act = _ACTIVATIONS[self.spec.hidden_act]
        hidden = act(proj("gate_proj", self.spec.intermediate_size)(x, deterministic)) * proj(
            "up_proj", self.spec.intermediate_size
        )(x, deterministic)
        return proj("down_proj", self.spec.hidden_size)(hidden, deterministic)


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    spec: Qwen3Spec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        eps = self.spec.rms_norm_eps
        attn = Qwen3Attention(self.spec, self.dtype, self.adapter_dropout, name="self_attn")
        x = x + attn(Qwen3RMSNorm(eps, self.dtype, name="input_layernorm")(x), cos, sin, allowed, deterministic)
        mlp = Qwen3MLP(self.spec, self.dtype, self.adapter_dropout, name="mlp")
        return x + mlp(Qwen3RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x), deterministic)


class Qwen3Backbone(nn.Module):
    """Qwen3Model: embeddings, decoder layers and the final norm; returns the normed hidden states [B, S, H]."""

    spec: Qwen3Spec
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0
    remat: bool = False  # recompute each layer in the backward pass (activation memory of one layer, not all)

    def setup(self) -> None:
        spec = self.spec
        self.embed_tokens = nn.Embed(
            spec.vocab_size,
            spec.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(spec.initializer_range),
        )
        # static_argnums counts `self`: (x, cos, sin, allowed, deterministic) -> deterministic is 5.
        layer_cls = nn.remat(Qwen3DecoderLayer, static_argnums=(5,)) if self.remat else Qwen3DecoderLayer
        self.layers = [
            layer_cls(spec, self.dtype, self.adapter_dropout, name=f"layers_{i}") for i in range(spec.num_layers)
        ]
        self.norm = Qwen3RMSNorm(spec.rms_norm_eps, self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        hidden = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(self.spec, input_ids.shape[-1], self.dtype)
        masks = {w: attention_allowed(attention_mask, w) for w in set(self.spec.layer_windows)}
        for layer, window in zip(self.layers, self.spec.layer_windows):
            hidden = layer(hidden, cos, sin, masks[window], deterministic)
        return self.norm(hidden)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: hidden @ embed_tokens^T."""
        return self.embed_tokens.attend(hidden)


class Qwen3ForTask(nn.Module):
    """The backbone under ``model`` plus the head of one task (lm, classification/regression, qa)."""

    spec: Qwen3Spec
    task: str
    num_labels: int = 2
    dtype: Any = jnp.float32
    adapter_dropout: float = 0.0
    classifier_dropout: float = 0.0
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True
    ) -> dict[str, jax.Array]:
        spec = self.spec
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        backbone = Qwen3Backbone(spec, self.dtype, self.adapter_dropout, self.remat, name="model")
        hidden = backbone(input_ids, attention_mask, deterministic)
        head_init = nn.initializers.normal(spec.initializer_range)
        if self.task == "lm":
            if spec.tie_word_embeddings:
                logits = backbone.attend(hidden)
            else:
                lm_head = nn.Dense(
                    spec.vocab_size, use_bias=False, dtype=self.dtype, kernel_init=head_init, name="lm_head"
                )
                logits = lm_head(hidden)
            return {"logits": logits.astype(jnp.float32)}
        hidden = nn.Dropout(rate=self.classifier_dropout)(hidden, deterministic=deterministic)
        if self.task == "qa":
            logits = nn.Dense(2, use_bias=True, dtype=self.dtype, kernel_init=head_init, name="qa_outputs")(hidden)
            logits = logits.astype(jnp.float32)
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        if self.task in ("classification", "regression"):
            logits = nn.Dense(self.num_labels, use_bias=False, dtype=self.dtype, kernel_init=head_init, name="score")(
                hidden
            )
            batch, seq_len = input_ids.shape
            if spec.pad_token_id is None:
                if batch != 1:
                    raise ValueError(
                        "Qwen3 sequence classification pools the last non-pad token and needs pad_token_id in the "
                        "config for batches > 1 (set hf_config.pad_token_id to the tokenizer's pad token id)"
                    )
                last = jnp.full((batch,), seq_len - 1)
            else:
                # transformers' rule: the rightmost position whose token is not pad_token_id (0 if all are pad).
                non_pad = (input_ids != spec.pad_token_id).astype(jnp.int32)
                last = jnp.argmax(jnp.arange(seq_len, dtype=jnp.int32) * non_pad, axis=-1)
            pooled = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
            return {"logits": pooled.astype(jnp.float32)}
        raise ValueError(
            f"task '{self.task}' is not supported by Qwen3 (supported: lm, classification, regression, qa)"
        )
