"""SoRA's pure rules (``adapad_jax.methods.sora``) against a NumPy re-derivation of ``TsinghuaC3I/SoRA``.

Each helper below restates one reference file in float64 NumPy, in the reference's own order of operations
(layout: reference ``gate`` [1, r], ``lora_A`` [r, in], ``lora_B`` [out, r]); each assertion names the rule and
the file it comes from.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.methods import sora
from reference_libs import import_reference


def _np_sparse_adamw(p, grads, *, lr, xi, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
    """``src/sparse_optimizer.py`` SparseAdamW.step, gradient by gradient, then its three masked writes."""
    p = np.array(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    history = []
    for t, grad in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
        denom = np.sqrt(v) + eps
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        to_add = (m / denom) * -step_size
        if weight_decay > 0:
            to_add = to_add + (-lr * weight_decay) * p
        p = p + to_add
        if xi > 0:
            p[p > xi] -= xi
            p[p < -xi] += xi
            p[abs(p) < xi] = 0.0
        history.append(p.copy())
    return history


def test_reference_threshold_reproduces_the_three_in_order_masked_writes():
    """``src/sparse_optimizer.py``: p[p>xi]-=xi; p[p<-xi]+=xi; p[|p|<xi]=0, the last on the shifted values."""
    xi = 0.25
    p = np.array([0.1, -0.2, 0.25, -0.25, 0.3, -0.4, 0.5, -0.5, 0.6, -0.75, 1.0, 0.0], np.float32)
    # by hand: |p|<xi -> 0; |p|==xi stays; xi<|p|<2xi -> 0; |p|==2xi -> +-xi; |p|>2xi -> p -+ xi
    expected = [0.0, 0.0, 0.25, -0.25, 0.0, 0.0, 0.25, -0.25, 0.35, -0.5, 0.75, 0.0]
    ours = np.asarray(sora.reference_threshold(jnp.asarray(p), xi))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-7, err_msg="sparse_optimizer.py threshold, by hand")
    shifted = p.astype(np.float64).copy()
    shifted[shifted > xi] -= xi
    shifted[shifted < -xi] += xi
    shifted[abs(shifted) < xi] = 0.0
    np.testing.assert_allclose(ours, shifted, rtol=0, atol=1e-7, err_msg="sparse_optimizer.py threshold")
    np.testing.assert_array_equal(np.asarray(sora.reference_threshold(jnp.asarray(p), 0.0)), p,
                                  err_msg="sparse_optimizer.py: `if self.sparse_lambda > 0` skips xi = 0")
    np.testing.assert_array_equal(np.asarray(sora.reference_threshold(jnp.asarray(p), -0.1)), p,
                                  err_msg="sparse_optimizer.py: a negative xi does nothing")


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_gate_step_matches_sparse_adamw_over_several_steps(weight_decay):
    """``src/sparse_optimizer.py`` SparseAdamW (HF bias correction in the step size, eps after sqrt, threshold by
    xi not lr * xi) over 8 steps with hand-set gradients, jitted with lr and xi traced; zeros and revivals agree."""
    gates = [np.array([0.03, -0.12, 0.5, 0.0], np.float32), np.array([1.5, -0.02, 0.2, -0.9, 0.07], np.float32)]
    grads = [[np.array([1.0, -1.0, 0.5, -2.0]), np.array([0.3, 1.0, -0.4, 0.2, -1.0])],
             [np.array([0.5, -0.5, 1.0, -1.0]), np.array([0.1, 2.0, -0.4, 0.3, -1.0])],
             [np.array([-2.0, -1.5, 1.0, 3.0]), np.array([0.2, -1.0, -0.5, 0.3, 0.5])],
             [np.array([-1.0, 0.2, 1.0, 1.0]), np.array([0.4, -3.0, 0.5, 0.2, 0.5])],
             [np.array([-0.5, 0.2, -1.0, 1.0]), np.array([0.1, -1.0, 0.6, 0.1, -0.5])],
             [np.array([-0.5, 0.1, -2.0, 0.5]), np.array([-0.1, -1.0, 0.6, 0.1, 0.5])],
             [np.array([0.5, 0.1, -1.0, 0.5]), np.array([-0.2, 0.5, 0.6, 0.1, 0.5])],
             [np.array([0.5, 0.2, -1.0, 0.2]), np.array([-0.3, 0.5, 0.6, 0.1, 0.2])]]
    lr, xi = 0.1, 0.03
    refs = [_np_sparse_adamw(g, [step[m] for step in grads], lr=lr, xi=xi, weight_decay=weight_decay)
            for m, g in enumerate(gates)]
    step = jax.jit(lambda p, gr, s, lr_, xi_: sora.gate_step(p, gr, s, lr=lr_, xi=xi_, weight_decay=weight_decay))
    ours = [jnp.asarray(g) for g in gates]
    state = sora.init_gate_state(ours)
    zeroed = revived = 0
    worst = 0.0
    for t, step_grads in enumerate(grads):
        before = [np.asarray(g) for g in ours]
        ours, state = step(ours, [jnp.asarray(g, jnp.float32) for g in step_grads], state, lr, xi)
        assert int(state.count) == t + 1, "sparse_optimizer.py: state['step'] += 1 per step"
        for m in range(len(gates)):
            mine, ref = np.asarray(ours[m]), refs[m][t]
            np.testing.assert_array_equal(mine == 0, ref == 0,
                                          err_msg=f"step {t + 1} module {m}: zero gates, sparse_optimizer.py")
            worst = max(worst, float(np.max(np.abs(mine - ref))))
            np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {t + 1} module {m}: SparseAdamW.step, sparse_optimizer.py")
            zeroed += int(np.sum((before[m] != 0) & (mine == 0)))
            revived += int(np.sum((before[m] == 0) & (mine != 0)))
    assert zeroed >= 2 and revived >= 1, (zeroed, revived)  # the run exercises both
    assert worst < 1e-6, f"max |ours - reference| {worst}: float32 1 - 0.999**t alone costs ~5e-6 here"


def test_gate_step_threshold_is_not_scaled_by_lr():
    """``run_glue.py`` imports ``src/sparse_optimizer.py`` (threshold xi), not ``sparse_optimizer_multiply_lr.py``
    (threshold lr * xi): a gate at 0.3 with zero gradient and xi = 0.1 ends at 0.2, not 0.3 - 0.01 * 0.1."""
    gates = [jnp.asarray([0.3, -0.3], jnp.float32)]
    new, _ = sora.gate_step(gates, [jnp.zeros(2)], sora.init_gate_state(gates), lr=0.01, xi=0.1)
    np.testing.assert_allclose(np.asarray(new[0]), [0.2, -0.2], rtol=0, atol=1e-7)


def test_xi_schedules_at_a_few_stages():
    """``src/sparse_optimizer.py`` _build_lambda_list / step_lambda, hand-computed: stage 0 keeps xi itself, each
    later stage (``run_glue.py``'s extra 15-epoch trainings) takes the next entry, the last one is held."""
    # scripts/run_glue_sora_schedule_dense.sh: xi 0 -> 7e-4 over 7 values (6 equal steps)
    for stage, expected in [(0, 0.0), (1, 7e-4 / 6), (3, 3.5e-4), (6, 7e-4), (9, 7e-4)]:
        assert sora.xi_at_stage(stage, "linear", 0.0, 7e-4, 7) == pytest.approx(expected, rel=1e-12), stage
    middle = math.log((math.exp(0.1) + math.exp(1.0)) / 2)
    for stage, expected in [(0, 0.1), (1, middle), (2, 1.0), (5, 1.0)]:
        assert sora.xi_at_stage(stage, "log_linear", 0.1, 1.0, 3) == pytest.approx(expected, rel=1e-14), stage
    for stage, expected in [(0, 1e-4), (1, 1e-3), (2, 1e-2)]:
        assert sora.xi_at_stage(stage, "exp_linear", 1e-4, 1e-2, 3) == pytest.approx(expected, rel=1e-12), stage
    assert sora.xi_at_stage(4, None, 3e-4) == 3e-4, "no schedule: step_lambda does nothing"


@pytest.mark.parametrize("kind,xi,max_xi,num,needle", [
    ("cosine", 1e-3, 1e-2, 3, "one of"),
    ("linear", 1e-3, 1e-2, 0, "lambda_num"),
    ("exp_linear", 0.0, 7e-4, 7, "exp_linear"),
])
def test_bad_xi_schedule_is_refused_with_one_line(kind, xi, max_xi, num, needle):
    """A schedule the reference cannot run (NotImplementedError, empty list, log(0)) fails before any compute."""
    with pytest.raises(ValueError, match=needle) as info:
        sora.xi_at_stage(2, kind, xi, max_xi, num)
    assert "\n" not in str(info.value)


def test_l1_term_is_a_mean_over_every_gate_of_every_module():
    """``src/trainer.py`` compute_loss: loss += sparse_lambda * sum|gate| / p_total, p_total over all modules."""
    gates = [jnp.asarray([1.0, -2.0, 0.0, 3.0]), jnp.asarray([0.5, -0.5])]
    assert float(sora.l1_gate_penalty(gates, 10.0)) == pytest.approx(10.0 * 7.0 / 6.0, rel=1e-6)
    grad = jax.grad(lambda g: sora.l1_gate_penalty(g, 10.0))(gates)
    np.testing.assert_allclose(np.asarray(grad[1]), [10 / 6, -10 / 6], rtol=1e-6, err_msg="d/dg of eta*mean|g|")


def test_gated_forward_matches_lowranklinear():
    """``src/lora.py`` LowRankLinear.forward: ((x @ A.T) * gate) @ B.T * (alpha / r), B in [out, r]."""
    rng = np.random.default_rng(0)
    r, fan_in, fan_out, alpha = 4, 5, 3, 16
    x = rng.standard_normal((2, 7, fan_in)).astype(np.float32)
    a = rng.standard_normal((r, fan_in)).astype(np.float32)
    b_torch = rng.standard_normal((fan_out, r)).astype(np.float32)
    gate = np.array([[0.7, 0.0, -1.2, 0.3]], np.float32)
    expected = ((x.astype(np.float64) @ a.T) * gate) @ b_torch.T * (alpha / r)
    ours = sora.gated_delta(jnp.asarray(x), jnp.asarray(gate[0]), jnp.asarray(a), jnp.asarray(b_torch.T),
                            sora.scaling(alpha, r))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5, err_msg="src/lora.py forward")


def test_init_matches_lowranklinear():
    """``src/lora.py``: gate ~ randn(1, r); kaiming_uniform_(lora_A, a=sqrt(5)) on [r, in]; lora_B zeros."""
    r, fan_in, fan_out = 512, 48, 7
    module = sora.init_module(jax.random.PRNGKey(0), r, fan_in, fan_out)
    assert module["g"].shape == (r,) and module["a"].shape == (r, fan_in) and module["b"].shape == (r, fan_out)
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # torch.nn.init.calculate_gain("leaky_relu", sqrt 5)
    bound = gain * math.sqrt(3.0 / fan_in)  # kaiming_uniform_ with fan_in = lora_A.size(1)
    a = np.asarray(module["a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound, (np.abs(a).max(), bound)
    assert abs(a.mean()) < 0.01 and abs(a.std() - bound / math.sqrt(3)) < 0.01 * bound
    g = np.asarray(module["g"])
    assert abs(g.mean()) < 0.15 and abs(g.std() - 1.0) < 0.1, (g.mean(), g.std())
    assert not np.any(np.asarray(module["b"])), "nn.init.zeros_(lora_B)"


def test_export_fold_reproduces_the_gated_forward_with_zero_gates_dropped():
    """Folding g * alpha / r into B and dropping zero gates leaves ``src/lora.py``'s forward unchanged at PEFT
    scaling 1 (x @ lora_A.T @ lora_B.T), with rank = the number of non-zero gates."""
    rng = np.random.default_rng(1)
    r, fan_in, fan_out, alpha = 6, 5, 4, 16
    x = rng.standard_normal((3, fan_in))
    a = rng.standard_normal((r, fan_in)).astype(np.float32)
    b = rng.standard_normal((r, fan_out)).astype(np.float32)
    gate = np.array([0.0, 1.3, 0.0, -0.4, 2.0, 0.0], np.float32)
    folded = sora.export_fold(jnp.asarray(gate), jnp.asarray(a), jnp.asarray(b), sora.scaling(alpha, r))
    assert folded["rank"] == 3 and folded["a"].shape == (3, fan_in) and folded["b"].shape == (3, fan_out)
    np.testing.assert_array_equal(folded["a"], a[[1, 3, 4]], err_msg="the kept A rows, in order")
    gated = ((x @ a.T.astype(np.float64)) * gate) @ b * (alpha / r)
    np.testing.assert_allclose(x @ folded["a"].T @ folded["b"], gated, rtol=1e-5, atol=1e-6,
                               err_msg="export fold vs src/lora.py forward")
    empty = sora.export_fold(jnp.zeros(r), jnp.asarray(a), jnp.asarray(b), 1.0)
    assert empty["rank"] == 0 and empty["a"].shape == (0, fan_in)


def test_parameter_counts_by_hand_beside_the_reference_count():
    """Ours: factors of non-zero gates (in + out each), gates, head. ``src/util.py``
    compute_trainable_sparse_param: all non-gate trainables minus 2 * hidden per zero gate (too little for FFN)."""
    hidden, head = 8, 10
    shapes = [(8, 8), (8, 32)]  # an attention-like and an FFN-like module
    gates = [jnp.asarray([1.0, 0.0, 2.0, 0.0]), jnp.asarray([0.0, 0.0, 0.0, 5.0])]
    assert [np.asarray(c).tolist() for c in sora.committed(gates)] == [[True, False, True, False],
                                                                      [False, False, False, True]]
    assert sora.parameter_counts(gates, shapes, head) == {"factors": 2 * 16 + 1 * 40, "gates": 8, "head": 10}
    sparse, total = sora.reference_count(gates, shapes, hidden, other_trainable=head)
    assert total == 4 * 16 + 4 * 40 + 10, "src/util.py: every trainable non-gate parameter"
    assert sparse == total - 5 * hidden * 2, "src/util.py: minus zero gates * hidden_size * 2"
    # the undercount: 3 zeroed slots on the FFN module free 40 each, util.py deducts 16 each
    assert sparse - (72 + head) == 3 * (40 - 2 * hidden)


def test_export_fold_loads_into_peft_lora_and_reproduces_the_gated_forward():
    """The folded modules, given to PEFT LoRA as ``rank_pattern`` = ``alpha_pattern`` = k (scaling 1), make PEFT's
    forward equal the gated ``src/lora.py`` forward of the unfolded adapters (different k per module)."""
    torch = import_reference("torch")
    peft = import_reference("peft")
    rng = np.random.default_rng(2)
    sizes, r, alpha = {"fc1": (5, 6), "fc2": (6, 3)}, 4, 16
    gates = {"fc1": np.array([0.0, 1.1, -0.7, 0.0], np.float32), "fc2": np.array([0.4, 0.0, 0.0, 0.0], np.float32)}
    factors = {name: (rng.standard_normal((r, i)).astype(np.float32), rng.standard_normal((r, o)).astype(np.float32))
               for name, (i, o) in sizes.items()}
    folded = {name: sora.export_fold(jnp.asarray(gates[name]), jnp.asarray(a), jnp.asarray(b), sora.scaling(alpha, r))
              for name, (a, b) in factors.items()}
    assert {name: f["rank"] for name, f in folded.items()} == {"fc1": 2, "fc2": 1}

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("fc1", torch.nn.Linear(*sizes["fc1"]))
    base.add_module("act", torch.nn.ReLU())
    base.add_module("fc2", torch.nn.Linear(*sizes["fc2"]))
    weights = {name: (getattr(base, name).weight.detach().numpy().astype(np.float64),
                      getattr(base, name).bias.detach().numpy().astype(np.float64)) for name in sizes}
    ranks = {name: f["rank"] for name, f in folded.items()}
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=list(sizes), rank_pattern=ranks, alpha_pattern=ranks)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, f in folded.items():
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(f["a"]))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(f["b"].T)))
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with torch.no_grad():
        peft_out = model(torch.from_numpy(x)).numpy()

    h = x.astype(np.float64)
    for name in ("fc1", "fc2"):
        w, bias = weights[name]
        a, b = factors[name]
        gated = ((h @ a.T) * gates[name]) @ b * (alpha / r)  # src/lora.py forward, B^T in our [r, out] layout
        h = h @ w.T + bias + gated
        if name == "fc1":
            h = np.maximum(h, 0.0)
    np.testing.assert_allclose(peft_out, h, rtol=1e-5, atol=1e-5, err_msg="PEFT LoRA of export_fold vs gated forward")
