"""The orthogonal regulariser against PEFT's own AdaLoRA regulariser (``AdaLoraModel.forward``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_libs import import_reference

from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.methods.orthogonality import orthogonality_penalty

torch = import_reference("torch")
peft = import_reference("peft")

SHAPES = [(6, 5), (4, 7), (5, 5)]  # (in, out) per adapted module
R_MAX, COEF = 4, 0.3


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(i, o) for i, o in SHAPES])

    def forward(self, x):
        return type("Out", (), {"loss": torch.zeros((), dtype=torch.float64)})()


def _peft_penalty(a_rows, b_rows):
    """PEFT's weighted regulariser and its gradients w.r.t. each module's committed A [r, in] and B [out, r]."""
    torch.manual_seed(0)
    config = peft.AdaLoraConfig(init_r=R_MAX, target_modules=[f"layers.{m}" for m in range(len(SHAPES))],
                                orth_reg_weight=COEF, total_step=10)
    model = peft.get_peft_model(_Net().double(), config)
    params = []
    for m, layer in enumerate(model.base_model.model.layers):
        a = torch.nn.Parameter(torch.tensor(a_rows[m], dtype=torch.float64))
        b = torch.nn.Parameter(torch.tensor(b_rows[m].T.copy(), dtype=torch.float64))
        layer.lora_A["default"], layer.lora_B["default"] = a, b
        params.append((a, b))
    loss = model.base_model(torch.zeros(1, 1)).loss
    loss.backward()
    return float(loss.detach()), [(a.grad.numpy(), b.grad.numpy().T) for a, b in params]


def test_penalty_matches_peft_adalora_value_and_gradient():
    key = jax.random.PRNGKey(0)
    slots = {"a": [], "b": []}
    for m, (i, o) in enumerate(SHAPES):
        ka, kb = jax.random.split(jax.random.fold_in(key, m))
        slots["a"].append(0.5 * jax.random.normal(ka, (R_MAX, i)))
        slots["b"].append(0.5 * jax.random.normal(kb, (R_MAX, o)))
    rank = jnp.array([1, 3, 2], jnp.int32)
    committed, _ = alloc_lib.masks_from_rank(rank, R_MAX, jnp.asarray(0))
    value, grads = jax.value_and_grad(lambda s: COEF * orthogonality_penalty(s, committed))(slots)
    rows = [np.asarray(s)[: int(r)] for s, r in zip(slots["a"], rank)]
    b_rows = [np.asarray(s)[: int(r)] for s, r in zip(slots["b"], rank)]
    ref_value, ref_grads = _peft_penalty(rows, b_rows)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
    for m, (ga, gb) in enumerate(ref_grads):
        r = int(rank[m])
        np.testing.assert_allclose(np.asarray(grads["a"][m])[:r], ga, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads["b"][m])[:r], gb, rtol=1e-4, atol=1e-6)
        assert np.all(np.asarray(grads["a"][m])[r:] == 0) and np.all(np.asarray(grads["b"][m])[r:] == 0)
        assert np.abs(ga).max() > 1e-3


def test_penalty_is_finite_at_an_exact_orthonormal_point():
    a = jnp.eye(2, 3)
    slots = {"a": [a], "b": [jnp.eye(2, 4)]}
    committed = jnp.array([[True, True]])
    value, grads = jax.value_and_grad(lambda s: orthogonality_penalty(s, committed))(slots)
    assert float(value) == 0.0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
