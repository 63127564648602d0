"""Fast paths that must equal the plain ones: DeBERTa's skew gather of relative positions, Qwen3 attention through
``jax.nn.dot_product_attention``, the adapter delta's hand-written backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util

from adapad_jax.adapters.layer import low_rank_delta
from adapad_jax.models.deberta_modules import relative_gather, relative_positions
from adapad_jax.models.qwen3_modules import with_attention_impl
from adapad_jax.models.registry import model_from_config


@pytest.mark.parametrize("seq_len, buckets, max_pos", [(9, 256, 512), (40, 8, 24), (1, 256, 512), (128, 256, 512)])
@pytest.mark.parametrize("sign", [1, -1])
def test_relative_gather_equals_take_along_axis_with_gradients(seq_len, buckets, max_pos, sign):
    span = buckets
    rel = relative_positions(seq_len, buckets, max_pos)
    index = np.clip(sign * rel + span, 0, 2 * span - 1)
    lo = index.min()
    index = index - lo
    rng = np.random.default_rng(seq_len)
    x = jnp.asarray(rng.normal(size=(2, 3, seq_len, index.max() + 3)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 3, seq_len, seq_len)), jnp.float32)

    def ours(x):
        return jnp.sum(relative_gather(x, index) * cot)

    def plain(x):
        return jnp.sum(jnp.take_along_axis(x, jnp.asarray(index)[None, None], axis=-1) * cot)

    np.testing.assert_array_equal(np.asarray(relative_gather(x, index)),
                                  np.take_along_axis(np.asarray(x), index[None, None], axis=-1))
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)


def test_relative_gather_takes_the_skew_path_only_for_toeplitz_indices():
    x = jnp.arange(2 * 4 * 7, dtype=jnp.float32).reshape(2, 4, 7)
    toeplitz = np.clip(relative_positions(4, 0, 0) + 3, 0, 6)
    hlo = jax.jit(lambda x: relative_gather(x, toeplitz)).lower(x).as_text()
    assert "gather" not in hlo
    bucketed = toeplitz.copy()
    bucketed[0, 3] = 5
    hlo = jax.jit(lambda x: relative_gather(x, bucketed)).lower(x).as_text()
    assert "gather" in hlo


def _tiny_qwen3(**overrides):
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    fields.update(overrides)
    return transformers.Qwen3Config(**fields)


@pytest.mark.parametrize("window", [None, 5])
def test_qwen3_dot_product_attention_equals_einsum_path(window):
    config = _tiny_qwen3(use_sliding_window=window is not None, sliding_window=window, max_window_layers=1)
    model = model_from_config(config, task="qa", num_labels=2, seed=3)
    if window is not None:
        assert model.module.spec.layer_windows == (None, 5)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 97, size=(3, 16)), jnp.int32)
    mask = np.ones((3, 16), np.int32)
    mask[1, 11:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    mask = jnp.asarray(mask)
    lora = traverse_util.unflatten_dict({
        t.flax_path + (k,): v for t in model.targets for k, v in {
            "a": jnp.asarray(rng.normal(0, 0.3, (2, t.in_features)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.3, (2, t.out_features)), jnp.float32),
            "coef": jnp.ones((2,), jnp.float32)}.items()})
    einsum_module = with_attention_impl(model.module, "einsum")
    dot_module = with_attention_impl(model.module, "dot_product")

    def loss(module, lora):
        out = module.apply({"params": model.params, "lora": lora}, ids, mask, deterministic=True)
        valid = mask.astype(jnp.float32)
        return jnp.sum((out["start_logits"] * valid) ** 2 + (out["end_logits"] * valid) ** 2), out

    (want, want_out), want_grads = jax.value_and_grad(lambda l: loss(einsum_module, l), has_aux=True)(lora)
    (got, got_out), got_grads = jax.value_and_grad(lambda l: loss(dot_module, l), has_aux=True)(lora)
    for key in ("start_logits", "end_logits"):
        valid = np.asarray(mask, bool)
        np.testing.assert_allclose(np.asarray(got_out[key])[valid], np.asarray(want_out[key])[valid],
                                   rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got_grads, want_grads)
    # the two paths really are different programs
    text = jax.jit(lambda l: loss(dot_module, l)[0]).lower(lora).as_text()
    assert text != jax.jit(lambda l: loss(einsum_module, l)[0]).lower(lora).as_text()


def test_qwen3_attention_impl_is_checked():
    model = model_from_config(_tiny_qwen3(), task="qa", num_labels=2)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        with_attention_impl(model.module, "flash")


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_low_rank_delta_value_and_gradients_equal_autodiff_of_the_einsums(lead):
    rng = np.random.default_rng(len(lead))
    x = jnp.asarray(rng.normal(size=lead + (6,)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    coef = jnp.asarray([2.0, 0.0, -0.5], jnp.float32)
    cot = jnp.asarray(rng.normal(size=lead + (5,)), jnp.float32)

    def plain(x, a, b, coef):
        return jnp.einsum("...r,ro->...o", jnp.einsum("...i,ri->...r", x, a) * coef, b)

    np.testing.assert_allclose(low_rank_delta(x, a, b, coef), plain(x, a, b, coef), rtol=1e-6, atol=1e-6)
    ours = jax.grad(lambda *args: jnp.sum(low_rank_delta(*args) * cot), argnums=(0, 1, 2, 3))(x, a, b, coef)
    want = jax.grad(lambda *args: jnp.sum(plain(*args) * cot), argnums=(0, 1, 2, 3))(x, a, b, coef)
    for got, ref in zip(ours, want):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # and under vmap inside jit (the per-example dropout path)
    per_example = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(low_rank_delta(x, a, b, coef)))))(x)
    np.testing.assert_allclose(per_example, jax.vmap(jax.grad(lambda x: jnp.sum(plain(x, a, b, coef))))(x),
                               rtol=1e-5, atol=1e-5)
