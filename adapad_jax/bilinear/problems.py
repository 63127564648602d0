"""Synthetic bilinear regression problems Y = W* X + E (paper Appendix F)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SPECTRA = ("exponential", "power_law", "uniform", "linear")


class BilinearProblem(NamedTuple):
    """One instance: ground truth `w_star` [d_out, d_in], inputs `x` [d_in, n], observations `y` [d_out, n]."""

    w_star: jax.Array
    x: jax.Array
    y: jax.Array


class ProblemStatistics(NamedTuple):
    """Sufficient statistics of a problem for the rank-1 subroutines (all divided by n).

    gram = X X^T / n, cross = Y X^T / n, ridge_inverse = (gram + ridge I)^{-1}.
    """

    gram: jax.Array
    cross: jax.Array
    ridge_inverse: jax.Array


def spectrum(
    kind: str,
    rank: int,
    *,
    decay: float = 0.5,
    power: float = 1.0,
    gap: float = 0.1,
    floor: float = 0.05,
) -> np.ndarray:
    """Singular values sigma_1..sigma_rank with sigma_1 = 1 for one of SPECTRA."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    index = np.arange(rank, dtype=np.float64)  # i - 1
    if kind == "exponential":
        if not 0.0 < decay < 1.0:
            raise ValueError(f"exponential spectrum needs 0 < decay < 1, got {decay}")
        return decay**index
    if kind == "power_law":
        if power <= 0.0:
            raise ValueError(f"power-law spectrum needs power > 0, got {power}")
        return (index + 1.0) ** (-power)
    if kind == "uniform":
        return np.ones(rank)
    if kind == "linear":
        if gap <= 0.0 or not 0.0 < floor < 1.0:
            raise ValueError(f"linear spectrum needs gap > 0 and 0 < floor < 1, got gap={gap}, floor={floor}")
        return np.maximum(1.0 - index * gap, floor)
    raise ValueError(f"unknown spectrum {kind!r}; expected one of {', '.join(SPECTRA)}")


def make_problem(
    key: jax.Array,
    singular_values: jax.Array,
    *,
    d_out: int,
    d_in: int,
    n: int,
    noise: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
) -> BilinearProblem:
    """Draw W* = U diag(sigma) V^T (Haar U, V), X with N(0, 1) entries and E with N(0, noise^2) entries."""
    rank = singular_values.shape[0]
    if rank > min(d_out, d_in):
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)}")
    key_u, key_v, key_x, key_e = jax.random.split(key, 4)
    left, _ = jnp.linalg.qr(jax.random.normal(key_u, (d_out, rank), dtype))
    right, _ = jnp.linalg.qr(jax.random.normal(key_v, (d_in, rank), dtype))
    w_star = (left * singular_values.astype(dtype)) @ right.T
    x = jax.random.normal(key_x, (d_in, n), dtype)
    y = w_star @ x + noise * jax.random.normal(key_e, (d_out, n), dtype)
    return BilinearProblem(w_star=w_star, x=x, y=y)


def problem_statistics(problem: BilinearProblem, ridge: float) -> ProblemStatistics:
    """Gram, cross-covariance and ridge-regularised inverse Gram, all normalised by n."""
    n = problem.x.shape[1]
    gram = problem.x @ problem.x.T / n
    cross = problem.y @ problem.x.T / n
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    ridge_inverse = jnp.linalg.solve(gram + ridge * eye, eye)
    return ProblemStatistics(gram=gram, cross=cross, ridge_inverse=ridge_inverse)
