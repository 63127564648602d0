"""Rank-1 subroutines on min_{u,v} ||Y_k - u v^T X||_F^2 / (2n), expressed through
the target's cross-covariance T_k = Y_k X^T / n and the Gram X X^T / n (so one
iteration costs O(d_out d_in + d_in^2), independent of n)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adapad_jax.bilinear.problems import ProblemStatistics

SUBROUTINES = ("als", "gd")


def als_left(v: jax.Array, target_cross: jax.Array, stats: ProblemStatistics) -> jax.Array:
    """argmin_u ||Y_k - u v^T X||_F^2: u = Y_k X^T v / ||X^T v||^2."""
    return target_cross @ v / (v @ stats.gram @ v)


def als_right(u: jax.Array, target_cross: jax.Array, stats: ProblemStatistics) -> jax.Array:
    """argmin_v ||Y_k - u v^T X||_F^2 / n + ridge ||u||^2 ||v||^2: v = (X X^T / n + ridge I)^{-1} X Y_k^T u / (n ||u||^2)."""
    return stats.ridge_inverse @ (target_cross.T @ u) / (u @ u)


def balance(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rescale to ||u|| = ||v|| without changing u v^T."""
    ratio = jnp.sqrt(jnp.linalg.norm(v) / jnp.linalg.norm(u))
    return u * ratio, v / ratio


def als_step(
    u: jax.Array, v: jax.Array, target_cross: jax.Array, stats: ProblemStatistics
) -> tuple[jax.Array, jax.Array]:
    """One ALS sweep (u given v, then v given u), balanced so ||u|| = ||v||.

    ALS depends on (u, v) only through u v^T, but the split of the scale between the
    factors drifts geometrically when the target moves (deflation), overflowing
    float32 within a few dozen rounds; balancing removes that without changing the iterates' product.
    """
    del u
    u_new = als_left(v, target_cross, stats)
    return balance(u_new, als_right(u_new, target_cross, stats))


def gd_step(
    u: jax.Array, v: jax.Array, target_cross: jax.Array, stats: ProblemStatistics, step_size: float
) -> tuple[jax.Array, jax.Array]:
    """One simultaneous gradient step on both factors of ||Y_k - u v^T X||^2 / (2n)."""
    gram_v = stats.gram @ v
    grad_u = u * (v @ gram_v) - target_cross @ v
    grad_v = gram_v * (u @ u) - target_cross.T @ u
    return u - step_size * grad_u, v - step_size * grad_v


def project(u: jax.Array, v: jax.Array, rho: float) -> tuple[jax.Array, jax.Array]:
    """Scale (u, v) so that ||u v^T||_F <= rho (rho = inf leaves them unchanged)."""
    norm = jnp.linalg.norm(u) * jnp.linalg.norm(v)
    shrink = jnp.sqrt(jnp.minimum(1.0, rho / jnp.maximum(norm, jnp.finfo(u.dtype).tiny)))
    return u * shrink, v * shrink


def run_rank1(
    subroutine: str,
    u: jax.Array,
    v: jax.Array,
    target_cross: jax.Array,
    stats: ProblemStatistics,
    iterations: jax.Array | int,
    step_size: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """`iterations` steps of the named subroutine, warm-started from (u, v)."""
    if subroutine == "als":
        step = lambda _, uv: als_step(*uv, target_cross, stats)
    elif subroutine == "gd":
        step = lambda _, uv: gd_step(*uv, target_cross, stats, step_size)
    else:
        raise ValueError(f"unknown subroutine {subroutine!r}; expected one of {', '.join(SUBROUTINES)}")
    return jax.lax.fori_loop(0, iterations, step, (u, v))
