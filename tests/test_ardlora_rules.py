"""ARD-LoRA's pure rules (``adapad_jax.methods.ardlora``) against hand-computed values.

There is no public code; the rules are the seed abstract's (effective rank round(r0 * alpha), floored at 1;
lambda * (l1(alpha) + beta * TV(alpha))) plus our documented choices (half-up rounding, capped at r_max; a
straight-through sigmoid slot mask; TV along the layer axis 0).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.methods import ardlora

R0, R_MAX = 4, 6


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_effective_rank_by_hand():
    """max(1, round(r0 * alpha)) with half-up rounding, capped at r_max; r0 = 4."""
    alpha = jnp.asarray([0.0, 0.1, 0.125, 0.3, 0.375, 0.5, 0.6, 0.625, 1.0, 1.3, 2.0, -0.5])
    # r0 * alpha = 0, 0.4, 0.5, 1.2, 1.5, 2, 2.4, 2.5, 4, 5.2, 8, -2
    expected = [1, 1, 1, 1, 2, 2, 2, 3, 4, 5, 6, 1]
    assert np.asarray(ardlora.effective_rank(alpha, R0, R_MAX)).tolist() == expected
    assert ardlora.effective_rank(alpha, R0, R_MAX).dtype == jnp.int32
    assert np.asarray(ardlora.effective_rank(ardlora.init_alpha((3,)), R0, R_MAX)).tolist() == [R0] * 3


def test_soft_and_hard_masks_by_hand():
    """Slot k is on iff k <= effective rank; its soft mask is sigmoid((r0 alpha - k + 0.5) / tau)."""
    alpha = jnp.asarray([0.6, 0.05])  # r0 alpha = 2.4 -> rank 2; 0.2 -> rank 1 (the floor)
    hard = np.asarray(ardlora.hard_mask(alpha, R0, R_MAX))
    np.testing.assert_array_equal(hard, [[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    soft = np.asarray(ardlora.soft_mask(alpha, R0, R_MAX, tau=0.5))
    expected = [[_sigmoid((2.4 - k + 0.5) / 0.5) for k in range(1, R_MAX + 1)],
                [_sigmoid((0.2 - k + 0.5) / 0.5) for k in range(1, R_MAX + 1)]]
    np.testing.assert_allclose(soft, expected, rtol=1e-6)
    boundary = np.asarray(ardlora.soft_mask(jnp.asarray([0.625]), R0, R_MAX))  # r0 alpha = 2.5 = k - 0.5 for k 3
    assert boundary[0, 2] == pytest.approx(0.5, abs=1e-7)


def test_straight_through_mask_forward_is_hard_gradient_is_soft():
    """slot_mask equals hard_mask; d(sum_k w_k mask_k)/d alpha = sum_k w_k r0 s_k (1 - s_k) / tau (by hand)."""
    alpha = jnp.asarray([0.6])
    tau = 0.5
    np.testing.assert_array_equal(np.asarray(ardlora.slot_mask(alpha, R0, R_MAX, tau)),
                                  np.asarray(ardlora.hard_mask(alpha, R0, R_MAX)))
    w = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    grad = jax.grad(lambda al: jnp.sum(ardlora.slot_mask(al, R0, R_MAX, tau)[0] * w))(alpha)
    s = [_sigmoid((2.4 - k + 0.5) / tau) for k in range(1, R_MAX + 1)]
    expected = sum((k + 1) * R0 * s[k] * (1 - s[k]) / tau for k in range(R_MAX))
    assert float(grad[0]) == pytest.approx(expected, rel=1e-5)


def test_masked_delta_by_hand():
    """((x a^T) * mask) b * scale with two of three slots on."""
    x = jnp.asarray([[1.0, 2.0]])
    a = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = jnp.asarray([[1.0], [10.0], [100.0]])
    mask = jnp.asarray([1.0, 1.0, 0.0])
    # x a^T = [1, 2, 3]; masked [1, 2, 0]; times b = 1 + 20 = 21; scale 0.5
    assert float(ardlora.masked_delta(x, a, b, mask, 0.5)[0, 0]) == pytest.approx(10.5)


def test_regulariser_by_hand():
    """lambda * (sum |alpha| + beta * TV), TV along axis 0 (layers) per column (module type / head)."""
    alpha = jnp.asarray([[1.0, 0.5], [0.5, -0.5], [2.0, 0.0]])  # 3 layers x 2 module types
    # l1 = 1 + .5 + .5 + .5 + 2 + 0 = 4.5; TV col 0: .5 + 1.5 = 2; col 1: 1 + .5 = 1.5; TV = 3.5
    assert float(ardlora.total_variation(alpha)) == pytest.approx(3.5)
    assert float(ardlora.regulariser(alpha, 0.1, 2.0)) == pytest.approx(0.1 * (4.5 + 2.0 * 3.5))
    assert float(ardlora.total_variation(jnp.asarray([[1.0, 5.0]]))) == 0.0, "one layer: no TV across types"
    grad = jax.grad(lambda al: ardlora.regulariser(al, 1.0, 1.0))(jnp.asarray([1.0, 3.0, 2.0]))
    # d l1 = sign = 1 each; d TV: |a1 - a0| + |a2 - a1| -> [-1, 1 + 1, -1]
    np.testing.assert_allclose(np.asarray(grad), [0.0, 3.0, 0.0])
