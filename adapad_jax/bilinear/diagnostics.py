"""Per-worker, per-round error bookkeeping of SPEC §1 (output space, relative to ||W* X||_F)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from adapad_jax.bilinear.deflation import DeflationTrace
from adapad_jax.bilinear.problems import BilinearProblem


class Diagnostics(NamedTuple):
    """numerical / mismatch / total [R, K] (NaN where a worker is inactive), rel_weight_error [R]."""

    numerical: jax.Array
    mismatch: jax.Array
    total: jax.Array
    rel_weight_error: jax.Array


def top_rank1(matrix: jax.Array) -> jax.Array:
    """Best rank-1 approximation (Eckart-Young) of a wide matrix: its leading SVD term p p^T M.

    p is the top eigenvector of the small Gram M M^T: XLA's CPU SVD with singular
    vectors is ~100x slower than eigh at these shapes.
    """
    _, vectors = jnp.linalg.eigh(matrix @ matrix.T)
    top = vectors[:, -1]
    return jnp.outer(top, top @ matrix)


def ideal_components(clean_target: jax.Array, count: int) -> jax.Array:
    """The first `count` SVD terms C*_k of the clean target W* X, stacked [count, d_out, n]."""
    left, values, right_t = jnp.linalg.svd(clean_target, full_matrices=False)
    if count > values.shape[0]:
        raise ValueError(f"{count} workers but W* X has only {values.shape[0]} singular values")
    return jnp.einsum("ak,k,kb->kab", left[:, :count], values[:count], right_t[:count])


def relative_weight_error(u: jax.Array, v: jax.Array, visible: jax.Array, w_star: jax.Array) -> jax.Array:
    """||sum_k visible_k u_k v_k^T - W*||_F / ||W*||_F."""
    estimate = jnp.einsum("k,ka,kb->ab", visible.astype(u.dtype), u, v)
    return jnp.linalg.norm(estimate - w_star) / jnp.linalg.norm(w_star)


def row_space_basis(problem: BilinearProblem) -> jax.Array:
    """Orthonormal basis [n, d_out + d_in] of a space holding the rows of Y and of X.

    Every target Y - A X, every fit and every ideal component has its rows there,
    so projecting onto it keeps all Frobenius norms and shrinks n to d_out + d_in.
    """
    basis, _ = jnp.linalg.qr(jnp.concatenate([problem.y, problem.x], axis=0).T)
    return basis


@jax.jit
def diagnose(problem: BilinearProblem, trace: DeflationTrace) -> Diagnostics:
    """Numerical error, deflation mismatch and total error per worker and round; relative weight error per round.

    At round t worker k's target is Y_{k,t} = Y - sum_{j<k} u_{j,t-1} v_{j,t-1}^T X over
    the predecessors that had broadcast by round t-1; F_{k,t} is its top SVD term.
    """
    rounds, workers, _ = trace.u.shape
    basis = row_space_basis(problem)
    x = problem.x @ basis
    y = problem.y @ basis
    clean = problem.w_star @ x
    scale = jnp.linalg.norm(clean)
    ideal = ideal_components(clean, workers)  # [K, d_out, d_out + d_in]
    published = trace.published.astype(trace.u.dtype)
    visible_before = jnp.concatenate([jnp.zeros_like(published[:1]), published[:-1]], axis=0)
    u_before = jnp.concatenate([jnp.zeros_like(trace.u[:1]), trace.u[:-1]], axis=0)
    v_before = jnp.concatenate([jnp.zeros_like(trace.v[:1]), trace.v[:-1]], axis=0)
    strictly_before = (jnp.arange(workers)[None, :] < jnp.arange(workers)[:, None]).astype(trace.u.dtype)

    def one_round(round_inputs):
        u, v, u_prev, v_prev, visible_prev = round_inputs
        weights = strictly_before * visible_prev[None, :]
        deflations = jnp.einsum("kj,ja,jb->kab", weights, u_prev, v_prev) @ x
        targets = y[None] - deflations
        best_fits = jax.vmap(top_rank1)(targets)
        estimates = jnp.einsum("ka,kb->kab", u, v @ x)
        norm = lambda m: jnp.linalg.norm(m, axis=(-2, -1)) / scale
        return norm(estimates - best_fits), norm(best_fits - ideal), norm(estimates - ideal)

    numerical, mismatch, total = jax.vmap(one_round)((trace.u, trace.v, u_before, v_before, visible_before))
    active = trace.published
    hide = lambda a: jnp.where(active, a, jnp.nan)
    rel = jax.vmap(relative_weight_error, in_axes=(0, 0, 0, None))(trace.u, trace.v, trace.published, problem.w_star)
    return Diagnostics(hide(numerical), hide(mismatch), hide(total), rel)
