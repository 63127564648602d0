"""The bilinear parallel-deflation engine against closed-form / float64 numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.bilinear import (
    DeflationSettings,
    activation_rounds,
    als_left,
    als_right,
    als_step,
    diagnose,
    gd_step,
    make_schedule,
    make_problem,
    problem_statistics,
    run_deflation,
    spectrum,
)
from adapad_jax.bilinear.deflation import initial_factors

D_OUT, D_IN, N, RANK = 16, 12, 96, 4


def _problem(seed: int, decay: float = 0.5, noise: float = 0.0, kind: str = "exponential"):
    sigma = jnp.asarray(spectrum(kind, RANK, decay=decay), jnp.float32)
    return make_problem(jax.random.key(seed), sigma, d_out=D_OUT, d_in=D_IN, n=N, noise=noise)


def _run(problem, seed: int, **settings):
    fields = dict(num_workers=RANK, rounds=24, inner_iterations=2) | settings
    config = DeflationSettings(**fields)
    trace = run_deflation(problem, jax.random.key(1000 + seed), config)
    return config, trace, diagnose(problem, trace)


def test_spectra_by_hand():
    np.testing.assert_allclose(spectrum("exponential", 3, decay=0.5), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(spectrum("power_law", 3, power=2.0), [1.0, 0.25, 1.0 / 9.0])
    np.testing.assert_allclose(spectrum("uniform", 3), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(spectrum("linear", 5, gap=0.3, floor=0.2), [1.0, 0.7, 0.4, 0.2, 0.2])
    with pytest.raises(ValueError, match="unknown spectrum 'cubic'"):
        spectrum("cubic", 3)


def test_problem_has_requested_singular_values():
    problem = _problem(0, decay=0.5)
    values = np.linalg.svd(np.asarray(problem.w_star, np.float64), compute_uv=False)
    np.testing.assert_allclose(values[:RANK], [1.0, 0.5, 0.25, 0.125], rtol=1e-5)
    assert values[RANK] < 1e-6


def test_als_half_steps_are_closed_form_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(D_IN, N))
    y = rng.normal(size=(D_OUT, N))
    u = rng.normal(size=D_OUT)
    v = rng.normal(size=D_IN)
    ridge = 1e-2
    problem = make_problem(jax.random.key(0), jnp.ones(1), d_out=D_OUT, d_in=D_IN, n=N)
    problem = problem._replace(x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.float32))
    stats = problem_statistics(problem, ridge)
    cross = stats.cross

    # u-step: min_u ||Y - u (X^T v)^T||_F  <=>  Y^T ~ (X^T v) u^T, one regression per output row.
    design_u = (x.T @ v)[:, None]
    u_ref = np.linalg.lstsq(design_u, y.T, rcond=None)[0][0]
    np.testing.assert_allclose(als_left(jnp.asarray(v, jnp.float32), cross, stats), u_ref, rtol=2e-4, atol=1e-6)

    # v-step: min_v ||Y - u v^T X||^2 / n + ridge ||u||^2 ||v||^2 as one stacked ridge regression.
    design_v = np.kron(u[:, None], x.T) / math.sqrt(N)  # row (i, j): u_i X[:, j]^T
    design_v = np.vstack([design_v, math.sqrt(ridge) * np.linalg.norm(u) * np.eye(D_IN)])
    target_v = np.concatenate([y.reshape(-1) / math.sqrt(N), np.zeros(D_IN)])
    v_ref = np.linalg.lstsq(design_v, target_v, rcond=None)[0]
    np.testing.assert_allclose(als_right(jnp.asarray(u, jnp.float32), cross, stats), v_ref, rtol=2e-4, atol=1e-6)

    # A full sweep: the same product u v^T as the two closed-form steps, with balanced factors.
    u_sweep_ref = u_ref
    design_v2 = np.vstack([np.kron(u_sweep_ref[:, None], x.T) / math.sqrt(N),
                           math.sqrt(ridge) * np.linalg.norm(u_sweep_ref) * np.eye(D_IN)])
    v_sweep_ref = np.linalg.lstsq(design_v2, target_v, rcond=None)[0]
    u_new, v_new = als_step(jnp.zeros(D_OUT), jnp.asarray(v, jnp.float32), cross, stats)
    np.testing.assert_allclose(np.outer(u_new, v_new), np.outer(u_sweep_ref, v_sweep_ref), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(u_new), np.linalg.norm(v_new), rtol=1e-5)


def test_gd_step_is_gradient_of_rank1_loss():
    problem = _problem(1, noise=0.1)
    stats = problem_statistics(problem, 0.0)
    key_u, key_v = jax.random.split(jax.random.key(3))
    u, v = jax.random.normal(key_u, (D_OUT,)), jax.random.normal(key_v, (D_IN,))
    loss = lambda u, v: 0.5 * jnp.sum((problem.y - jnp.outer(u, v @ problem.x)) ** 2) / N
    grad_u, grad_v = jax.grad(loss, argnums=(0, 1))(u, v)
    u_new, v_new = gd_step(u, v, stats.cross, stats, 0.1)
    np.testing.assert_allclose(u_new, u - 0.1 * grad_u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v_new, v - 0.1 * grad_v, rtol=1e-4, atol=1e-5)


def test_joint_gd_round_follows_autodiff_gradient():
    problem = _problem(2, noise=0.05)
    config = DeflationSettings(method="joint", subroutine="gd", num_workers=RANK, rounds=1, inner_iterations=1,
                               step_size=0.2)
    trace = run_deflation(problem, jax.random.key(5), config)
    u0, v0 = initial_factors(jax.random.key(5), config, D_OUT, D_IN)
    loss = lambda u, v: 0.5 * jnp.sum((problem.y - u.T @ (v @ problem.x)) ** 2) / N
    grad_u, grad_v = jax.grad(loss, argnums=(0, 1))(u0, v0)
    np.testing.assert_allclose(trace.u[0], u0 - 0.2 * grad_u, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trace.v[0], v0 - 0.2 * grad_v, rtol=1e-4, atol=1e-6)


def test_noiseless_top_r_svd_recovered():
    problem = _problem(3, decay=0.5)
    _, trace, _ = _run(problem, 3, rounds=20, inner_iterations=3)
    x = np.asarray(problem.x, np.float64)
    clean = np.asarray(problem.w_star, np.float64) @ x
    left, values, right_t = np.linalg.svd(clean, full_matrices=False)
    scale = np.linalg.norm(clean)
    u, v = np.asarray(trace.u[-1], np.float64), np.asarray(trace.v[-1], np.float64)
    for k in range(RANK):
        component = values[k] * np.outer(left[:, k], right_t[k])
        assert np.linalg.norm(np.outer(u[k], v[k] @ x) - component) / scale < 1e-4, k
    w_star = np.asarray(problem.w_star, np.float64)
    assert np.linalg.norm(u.T @ v - w_star) / np.linalg.norm(w_star) < 1e-4


def test_diagnostics_match_float64_reference():
    problem = _problem(4, decay=0.6, noise=0.02)
    config, trace, diag = _run(problem, 4, rounds=6, inner_iterations=1, stagger=2)
    x, y = np.asarray(problem.x, np.float64), np.asarray(problem.y, np.float64)
    w_star = np.asarray(problem.w_star, np.float64)
    clean = w_star @ x
    left, values, right_t = np.linalg.svd(clean, full_matrices=False)
    ideal = [values[k] * np.outer(left[:, k], right_t[k]) for k in range(RANK)]
    scale = np.linalg.norm(clean)
    u, v = np.asarray(trace.u, np.float64), np.asarray(trace.v, np.float64)
    starts = activation_rounds(config)
    np.testing.assert_array_equal(starts, [0, 2, 4, 6])
    for t in range(config.rounds):
        for k in range(RANK):
            if t < starts[k]:
                assert np.isnan(diag.mismatch[t, k]) and np.isnan(diag.total[t, k])
                continue
            target = y.copy()
            for j in range(k):
                if t >= 1 and t - 1 >= starts[j]:
                    target -= np.outer(u[t - 1, j], v[t - 1, j] @ x)
            tl, ts, tr = np.linalg.svd(target, full_matrices=False)
            fit = ts[0] * np.outer(tl[:, 0], tr[0])
            estimate = np.outer(u[t, k], v[t, k] @ x)
            np.testing.assert_allclose(diag.numerical[t, k], np.linalg.norm(estimate - fit) / scale, rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(diag.mismatch[t, k], np.linalg.norm(fit - ideal[k]) / scale, rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(diag.total[t, k], np.linalg.norm(estimate - ideal[k]) / scale, rtol=1e-3, atol=1e-6)
        visible = [k for k in range(RANK) if t >= starts[k]]
        estimate_w = sum(np.outer(u[t, k], v[t, k]) for k in visible)
        np.testing.assert_allclose(
            diag.rel_weight_error[t], np.linalg.norm(estimate_w - w_star) / np.linalg.norm(w_star), rtol=1e-4
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_noiseless_exponential_parallel_matches_sequential(seed):
    problem = _problem(10 + seed, decay=0.5)
    _, _, parallel = _run(problem, seed, method="parallel", rounds=24, inner_iterations=2)
    _, _, sequential = _run(problem, seed, method="sequential", rounds=24, inner_iterations=2)
    p_final, s_final = float(parallel.rel_weight_error[-1]), float(sequential.rel_weight_error[-1])
    assert p_final < 1e-3
    if not (p_final < 1e-5 and s_final < 1e-5):  # both at the float32 floor: a ratio means nothing
        assert p_final <= 2 * s_final, (p_final, s_final)


def test_mismatch_self_corrects_in_parallel_but_is_frozen_in_sequential():
    problem = _problem(20, decay=0.7)
    p_config, _, parallel = _run(problem, 20, method="parallel", rounds=24, inner_iterations=1)
    s_config, _, sequential = _run(problem, 20, method="sequential", rounds=24, inner_iterations=1)
    p_start, s_start = activation_rounds(p_config), activation_rounds(s_config)
    for k in (1, 2, 3):
        at_activation = float(parallel.mismatch[p_start[k], k])
        final = float(parallel.mismatch[-1, k])
        assert at_activation / final >= 100, (k + 1, at_activation, final)
        frozen = np.asarray(sequential.mismatch[s_start[k]:, k])
        assert np.all(np.isfinite(frozen)) and np.all(np.isnan(sequential.mismatch[: s_start[k], k]))
        np.testing.assert_allclose(frozen, frozen[0], rtol=1e-6)


def test_noise_parallel_and_sequential_reach_the_same_floor():
    for seed in (30, 31):
        problem = _problem(seed, decay=0.6, noise=0.1)
        _, _, parallel = _run(problem, seed, method="parallel", rounds=24, inner_iterations=2)
        _, _, sequential = _run(problem, seed, method="sequential", rounds=24, inner_iterations=2)
        p_final, s_final = float(parallel.rel_weight_error[-1]), float(sequential.rel_weight_error[-1])
        assert p_final > 1e-3  # a statistical floor, not the round-off floor
        assert 0.8 <= p_final / s_final <= 1.25, (p_final, s_final)


def test_schedules_by_hand():
    masks = make_schedule(DeflationSettings(num_workers=3, rounds=6, stagger=2))
    # Worker k broadcasts from round 2(k-1); a reserve trains privately once all predecessors have broadcast.
    np.testing.assert_array_equal(masks.published.T.astype(int), [[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(masks.update.T.astype(int), [[1] * 6, [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    off = make_schedule(DeflationSettings(num_workers=3, rounds=6, stagger=2, advance_learning=False))
    np.testing.assert_array_equal(off.update, off.published)
    seq = make_schedule(DeflationSettings(method="sequential", num_workers=3, rounds=6, inner_iterations=2))
    np.testing.assert_array_equal(seq.update.T.astype(int), [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(seq.published.T.astype(int), [[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert seq.iterations_per_round == 6  # matched compute: workers x inner iterations


def test_advance_learning_off_leaves_inactive_workers_at_init_and_projection_caps_norm():
    problem = _problem(40)
    config = DeflationSettings(num_workers=RANK, rounds=6, inner_iterations=1, stagger=2,
                               advance_learning=False, rho=0.3)
    trace = run_deflation(problem, jax.random.key(41), config)
    u0, v0 = initial_factors(jax.random.key(41), config, D_OUT, D_IN)
    starts = activation_rounds(config)
    for k in range(RANK):
        for t in range(min(starts[k], config.rounds)):
            np.testing.assert_allclose(trace.u[t, k], u0[k], rtol=1e-6)
            np.testing.assert_allclose(trace.v[t, k], v0[k], rtol=1e-6)
    norms = np.linalg.norm(trace.u, axis=-1) * np.linalg.norm(trace.v, axis=-1)
    assert norms.max() <= 0.3 * (1 + 1e-5)
    assert norms[-1, 0] == pytest.approx(0.3, rel=1e-4)  # sigma_1 = 1 > rho: the cap binds


def test_sharded_over_components_mesh_equals_unsharded():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("components",))
    sigma8 = jnp.asarray(spectrum("exponential", 8, decay=0.7), jnp.float32)
    problem = make_problem(jax.random.key(51), sigma8, d_out=D_OUT, d_in=D_IN, n=N, noise=0.01)
    for method, stagger in (("parallel", 1), ("parallel", 3), ("sequential", 1)):
        config = DeflationSettings(method=method, num_workers=8, rounds=10, inner_iterations=2, stagger=stagger)
        plain = run_deflation(problem, jax.random.key(52), config)
        sharded = run_deflation(problem, jax.random.key(52), config, mesh=mesh)
        assert len(sharded.u.sharding.device_set) == 4
        np.testing.assert_allclose(sharded.u, plain.u, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(sharded.v, plain.v, atol=1e-5, rtol=1e-5)
        d_plain, d_sharded = diagnose(problem, plain), diagnose(problem, sharded)
        np.testing.assert_allclose(d_sharded.rel_weight_error, d_plain.rel_weight_error, atol=1e-5)


def test_bad_settings_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown method 'diagonal'"):
        DeflationSettings(method="diagonal")
    with pytest.raises(ValueError, match="sequential deflation needs rounds >= num_workers"):
        DeflationSettings(method="sequential", num_workers=4, rounds=3)
    with pytest.raises(ValueError, match="rho must be > 0"):
        DeflationSettings(rho=0.0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="needs one named 'components'"):
        run_deflation(_problem(0), jax.random.key(0), DeflationSettings(num_workers=RANK), mesh=mesh)
