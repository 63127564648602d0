"""Parallel deflation (paper Algorithm 1), sequential deflation at matched compute,
and joint gradient descent, all with the workers on a leading `components` axis.

One round of parallel deflation: every worker k reads the estimates that its
predecessors broadcast at the end of the previous round, builds its deflation
target Y_k = Y - sum_{j<k} u_j v_j^T X, runs `inner_iterations` steps of its rank-1
subroutine warm-started from its own previous (u_k, v_k), optionally projects
onto ||u v^T|| <= rho, and broadcasts. Rounds are a `lax.scan`, workers a `vmap`;
with a mesh, workers are sharded over the `components` axis and the broadcast is
one `all_gather` per round.

Advance learning: a worker that has not activated yet (t < s_k) runs its subroutine
privately, without broadcasting, in the rounds where all of its predecessors have
broadcast, so it trains on its true deflation target Y_{k,t} (the paper's "trains
against the correct target"; in the LoRA trainer it is the one reserve slot above
the committed ones). Earlier than that its target still contains the un-broadcast
predecessor's component: a worker trained there converges to that component and,
once the predecessor is subtracted, restarts from the exact direction that was
removed (a saddle where round-off is amplified ~1e3x), so it idles instead. With
stagger = 1 no round qualifies and advance learning changes nothing; with stagger
s > 1 a reserve gets s - 1 private rounds.

Sequential deflation runs in the same engine with a different schedule: the R
rounds are split into K consecutive stages; in stage k only worker k updates,
with K * inner_iterations steps per round, so every method spends the same
K * R * inner_iterations subroutine iterations (matched compute), and a worker is
frozen once its stage ends.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from adapad_jax.bilinear.problems import BilinearProblem, ProblemStatistics, problem_statistics
from adapad_jax.bilinear.subroutines import SUBROUTINES, project, run_rank1

METHODS = ("parallel", "sequential", "joint")
COMPONENTS_AXIS = "components"


@dataclasses.dataclass(frozen=True)
class DeflationSettings:
    """Static settings of one deflation run (hashable, so it can be a jit static argument)."""

    method: str = "parallel"
    subroutine: str = "als"
    num_workers: int = 4
    rounds: int = 20
    inner_iterations: int = 1
    stagger: int = 1
    rho: float = math.inf
    advance_learning: bool = True
    ridge: float = 1e-6
    step_size: float = 0.3
    init_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.subroutine not in SUBROUTINES:
            raise ValueError(f"unknown subroutine {self.subroutine!r}; expected one of {', '.join(SUBROUTINES)}")
        if self.method == "joint" and self.subroutine != "gd":
            raise ValueError("the joint baseline is gradient descent: use subroutine='gd'")
        for name in ("num_workers", "rounds", "inner_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stagger < 0:
            raise ValueError(f"stagger must be >= 0, got {self.stagger}")
        if self.method == "sequential" and self.rounds < self.num_workers:
            raise ValueError(
                f"sequential deflation needs rounds >= num_workers (one stage per worker), "
                f"got rounds={self.rounds}, num_workers={self.num_workers}"
            )
        if not self.rho > 0.0:
            raise ValueError(f"rho must be > 0 (inf disables the projection), got {self.rho}")
        if self.ridge < 0.0 or self.step_size <= 0.0 or self.init_scale <= 0.0:
            raise ValueError("ridge must be >= 0, step_size and init_scale > 0")


class Schedule(NamedTuple):
    """Per-round masks [rounds, workers]: who updates, who has broadcast; inner steps per round."""

    update: np.ndarray
    published: np.ndarray
    iterations_per_round: int


class DeflationTrace(NamedTuple):
    """Estimates at the end of every round, u [R, K, d_out], v [R, K, d_in], and the schedule masks [R, K]."""

    u: jax.Array
    v: jax.Array
    update: jax.Array
    published: jax.Array


def activation_rounds(settings: DeflationSettings) -> np.ndarray:
    """Round at which each worker starts broadcasting (its activation s_k)."""
    k = np.arange(settings.num_workers)
    if settings.method == "parallel":
        return k * settings.stagger
    if settings.method == "sequential":
        return np.array([stage[0] for stage in _stages(settings)])
    return np.zeros_like(k)


def _stages(settings: DeflationSettings) -> list[np.ndarray]:
    return np.array_split(np.arange(settings.rounds), settings.num_workers)


def make_schedule(settings: DeflationSettings) -> Schedule:
    """Masks of who updates and who is visible to successors at each round."""
    rounds, workers = settings.rounds, settings.num_workers
    t = np.arange(rounds)[:, None]
    if settings.method == "parallel":
        published = t >= activation_rounds(settings)[None, :]
        if not settings.advance_learning:
            return Schedule(published, published, settings.inner_iterations)
        # A reserve trains privately once every predecessor has broadcast, i.e. on its
        # true deflation target Y_{k,t}.
        published_before = np.concatenate([np.zeros_like(published[:1]), published[:-1]], axis=0)
        predecessors_visible = np.logical_and.accumulate(
            np.concatenate([np.ones((rounds, 1), dtype=bool), published_before[:, :-1]], axis=1), axis=1
        )
        return Schedule(published | predecessors_visible, published, settings.inner_iterations)
    if settings.method == "sequential":
        stage_of_round = np.concatenate([np.full(len(s), k) for k, s in enumerate(_stages(settings))])[:, None]
        k = np.arange(workers)[None, :]
        return Schedule(stage_of_round == k, stage_of_round >= k, workers * settings.inner_iterations)
    everyone = np.ones((rounds, workers), dtype=bool)
    return Schedule(everyone, everyone, settings.inner_iterations)


def initial_factors(key: jax.Array, settings: DeflationSettings, d_out: int, d_in: int, dtype=jnp.float32):
    """Gaussian starting factors with ||u|| ~ ||v|| ~ init_scale, one row per worker."""
    key_u, key_v = jax.random.split(key)
    k = settings.num_workers
    u = jax.random.normal(key_u, (k, d_out), dtype) * (settings.init_scale / math.sqrt(d_out))
    v = jax.random.normal(key_v, (k, d_in), dtype) * (settings.init_scale / math.sqrt(d_in))
    return u, v


def _deflation_rounds(
    stats: ProblemStatistics,
    u0: jax.Array,
    v0: jax.Array,
    worker_ids: jax.Array,
    update: jax.Array,
    published_before: jax.Array,
    iterations: jax.Array,
    *,
    settings: DeflationSettings,
    gather,
) -> tuple[jax.Array, jax.Array]:
    """Scan over rounds for the workers held locally (rows of u0/v0, global ids `worker_ids`).

    `update` [R, K_local] is local; `published_before` [R, K] (the broadcast mask of
    the previous round) is global. `gather` turns local rows into all K rows.
    """
    num_workers = published_before.shape[1]
    strictly_before = jnp.arange(num_workers)[None, :] < worker_ids[:, None]  # [K_local, K]

    def one_worker(u, v, target_cross):
        u_new, v_new = run_rank1(
            settings.subroutine, u, v, target_cross, stats, iterations, settings.step_size
        )
        return project(u_new, v_new, settings.rho)

    def round_step(carry, masks):
        u, v = carry
        update_now, visible = masks
        all_u, all_v = gather(u), gather(v)
        broadcast_u = all_u * visible[:, None]
        broadcast_gram_v = (all_v @ stats.gram) * visible[:, None]
        deflation = jnp.einsum("ij,ja,jb->iab", strictly_before.astype(u.dtype), broadcast_u, broadcast_gram_v)
        targets = stats.cross[None] - deflation
        u_new, v_new = jax.vmap(one_worker)(u, v, targets)
        u = jnp.where(update_now[:, None], u_new, u)
        v = jnp.where(update_now[:, None], v_new, v)
        return (u, v), (u, v)

    _, (u_hist, v_hist) = jax.lax.scan(round_step, (u0, v0), (update, published_before))
    return u_hist, v_hist


def _joint_rounds(
    stats: ProblemStatistics,
    u0: jax.Array,
    v0: jax.Array,
    iterations: jax.Array,
    settings: DeflationSettings,
    rounds: int,
) -> tuple[jax.Array, jax.Array]:
    """Joint GD on ||Y - sum_k u_k v_k^T X||^2 / (2n), all pairs updated together."""

    def gd_step(_, uv):
        u, v = uv
        residual_cross = stats.cross - u.T @ (v @ stats.gram)
        u_new = u + settings.step_size * (v @ residual_cross.T)
        v_new = v + settings.step_size * (u @ residual_cross)
        return jax.vmap(project, in_axes=(0, 0, None))(u_new, v_new, settings.rho)

    def round_step(uv, _):
        uv = jax.lax.fori_loop(0, iterations, gd_step, uv)
        return uv, uv

    _, (u_hist, v_hist) = jax.lax.scan(round_step, (u0, v0), None, length=rounds)
    return u_hist, v_hist


def run_deflation(
    problem: BilinearProblem,
    key: jax.Array,
    settings: DeflationSettings,
    mesh: Mesh | None = None,
) -> DeflationTrace:
    """Run one method on one problem; with `mesh`, workers are sharded over its `components` axis."""
    if mesh is not None:
        if COMPONENTS_AXIS not in mesh.axis_names:
            raise ValueError(f"mesh has axes {mesh.axis_names}; it needs one named {COMPONENTS_AXIS!r}")
        shards = mesh.shape[COMPONENTS_AXIS]
        if settings.num_workers % shards:
            raise ValueError(
                f"num_workers={settings.num_workers} is not divisible by the {shards} devices "
                f"of the {COMPONENTS_AXIS!r} mesh axis"
            )
        if settings.method == "joint":
            raise ValueError("the joint GD baseline has no component-sharded implementation; run it without a mesh")
    schedule = make_schedule(settings)
    return _run_engine(
        problem, key, jnp.asarray(schedule.update), jnp.asarray(schedule.published),
        jnp.asarray(schedule.iterations_per_round, jnp.int32), engine=_engine_settings(settings), mesh=mesh,
    )


def run_deflation_seeds(
    problems: BilinearProblem, keys: jax.Array, settings: DeflationSettings
) -> DeflationTrace:
    """`run_deflation` vmapped over a leading seed axis of `problems` and `keys` (one compile per shape)."""
    schedule = make_schedule(settings)
    return _run_engine_seeds(
        problems, keys, jnp.asarray(schedule.update), jnp.asarray(schedule.published),
        jnp.asarray(schedule.iterations_per_round, jnp.int32), engine=_engine_settings(settings),
    )


def _engine_settings(settings: DeflationSettings) -> DeflationSettings:
    """The settings that change the compiled program; the schedule travels as arrays."""
    return dataclasses.replace(
        settings,
        method="joint" if settings.method == "joint" else "parallel",
        rounds=1, inner_iterations=1, stagger=0, advance_learning=True,
    )


def _trace(problem, key, update, published, iterations, engine: DeflationSettings, mesh: Mesh | None):
    d_out, d_in = problem.w_star.shape
    stats = problem_statistics(problem, engine.ridge)
    u0, v0 = initial_factors(key, engine, d_out, d_in, problem.y.dtype)
    if engine.method == "joint":
        u_hist, v_hist = _joint_rounds(stats, u0, v0, iterations, engine, update.shape[0])
        return DeflationTrace(u_hist, v_hist, update, published)
    published_before = jnp.concatenate([jnp.zeros_like(published[:1]), published[:-1]], axis=0)
    worker_ids = jnp.arange(engine.num_workers)
    if mesh is None:
        u_hist, v_hist = _deflation_rounds(
            stats, u0, v0, worker_ids, update, published_before, iterations,
            settings=engine, gather=lambda rows: rows,
        )
        return DeflationTrace(u_hist, v_hist, update, published)
    rows = PartitionSpec(COMPONENTS_AXIS)
    columns = PartitionSpec(None, COMPONENTS_AXIS)
    replicated = PartitionSpec()
    sharded_rounds = jax.shard_map(
        functools.partial(
            _deflation_rounds,
            settings=engine,
            gather=lambda local: jax.lax.all_gather(local, COMPONENTS_AXIS, axis=0, tiled=True),
        ),
        mesh=mesh,
        in_specs=(replicated, rows, rows, rows, columns, replicated, replicated),
        out_specs=(columns, columns),
    )
    u_hist, v_hist = sharded_rounds(stats, u0, v0, worker_ids, update, published_before, iterations)
    return DeflationTrace(u_hist, v_hist, update, published)


_run_engine = jax.jit(_trace, static_argnames=("engine", "mesh"))


def _trace_seeds(problems, keys, update, published, iterations, engine: DeflationSettings):
    one_seed = lambda problem, key: _trace(problem, key, update, published, iterations, engine, None)
    return jax.vmap(one_seed)(problems, keys)


_run_engine_seeds = jax.jit(_trace_seeds, static_argnames=("engine",))
