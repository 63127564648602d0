"""Appendix F studies of parallel deflation on bilinear regression Y = W* X + E.

    python launch/bilinear.py --config configs/studies/bilinear.py
    python launch/bilinear.py --config configs/studies/bilinear.py --config.quick=True
    python launch/bilinear.py --config configs/studies/bilinear.py \
        --config.experiments=convergence,self_correction --config.seeds=3 --config.output_dir=/tmp/bil

`experiments` is 'all', or a comma list of groups (convergence, self_correction,
noise, rate_fit, gap, advance_learning) and/or names (convergence_exponential, convergence_power_law,
convergence_uniform, self_correction, noise_<level>, rate_fit, gap_<delta>).

Sizes. The paper's Appendix F sizes were lost in the text we have; these are ours,
chosen so the default run takes a few minutes on 2 CPU cores (quick: every study on
d_out 16, d_in 12, n 96, rank 4, 16 rounds):
- convergence (F.1, Fig. 2): d_out 64, d_in 48, n 512, rank = workers 8, 32 rounds
  of 5 inner iterations; exponential q = 0.6, power law p = 1.
- self_correction (F.1, Fig. 3): d_out 32, d_in 24, n 256, rank 4, 32 rounds of one
  ALS sweep, exponential q = 0.7 (stagger 1: workers activate round by round).
- noise (F.1, Fig. 4): the self-correction problem with q = 0.6, 2 sweeps per round,
  Gaussian noise of standard deviation 0.01, 0.03, 0.1, 0.3 per entry.
- rate_fit (F.2, Fig. 5): d_out 32, d_in 24, n 256, rank 6, 40 rounds of 1 sweep, q = 0.75.
- gap (F.3, Fig. 6): linear spectrum sigma_i = max(1 - (i-1) delta, 0.05), rank 4,
  32 rounds of 2 sweeps, delta in 0.05, 0.1, 0.15, 0.2, 0.25.
- advance_learning: the self-correction problem with stagger 3 (each reserve worker gets 2 private rounds
  against its true deflation target before it activates), parallel ALS and GD, advance learning on vs off
  (results keys '<method>:advance_on' / ':advance_off'; Fig. 7). The solver's stagger 1 leaves no private round.
Sequential deflation gets the same compute: each round it spends workers x inner
iterations on the current component (the rounds are split into one stage per worker).
Everything is float32 (the tests' numerical floor allows for it).
"""

import ml_collections

ALL_METHODS = "parallel_als,sequential_als,parallel_gd,sequential_gd,joint_gd"


def _study(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
    """Default configuration of launch/bilinear.py."""
    config = ml_collections.ConfigDict()
    config.experiments = "all"
    config.seed = 0
    config.seeds = 5
    config.output_dir = "runs/bilinear"
    config.quick = False

    config.solver = _study(
        ridge=1e-6,  # ALS ridge, relative to X X^T / n (which is ~ I)
        gd_step_size=0.3,  # factored GD step on ||Y_k - u v^T X||^2 / (2n)
        init_scale=0.1,  # ||u_0|| ~ ||v_0|| ~ init_scale
        rho=float("inf"),  # projection cap on ||u v^T||_F; inf = off (paper's practice)
        stagger=1,  # worker k activates at round (k-1) * stagger
        advance_learning=True,
    )
    config.convergence = _study(
        d_out=64, d_in=48, n=512, rank=8, rounds=32, inner_iterations=5,
        decay=0.6, power=1.0, methods=ALL_METHODS,
    )
    config.self_correction = _study(
        d_out=32, d_in=24, n=256, rank=4, rounds=32, inner_iterations=1,
        decay=0.7, methods="parallel_als,sequential_als",
    )
    config.noise = _study(
        d_out=32, d_in=24, n=256, rank=4, rounds=32, inner_iterations=2,
        decay=0.6, levels="0.01,0.03,0.1,0.3", methods="parallel_als,sequential_als",
    )
    config.rate_fit = _study(
        d_out=32, d_in=24, n=256, rank=6, rounds=40, inner_iterations=1,
        decay=0.75, methods="parallel_als",
    )
    config.gap = _study(
        d_out=32, d_in=24, n=256, rank=4, rounds=32, inner_iterations=2,
        floor=0.05, deltas="0.05,0.1,0.15,0.2,0.25", methods="parallel_als",
    )
    config.advance_learning = _study(
        d_out=32, d_in=24, n=256, rank=4, rounds=32, inner_iterations=1,
        decay=0.7, stagger=3, methods="parallel_als,parallel_gd",
    )
    # What --config.quick=True changes: one small shape for every study, so that the
    # whole run compiles only a handful of programs (compilation dominates at this size).
    quick_shape = dict(d_out=16, d_in=12, n=96, rank=4, rounds=16)
    config.quick_overrides = _study(
        convergence=dict(quick_shape, inner_iterations=3),
        self_correction=dict(quick_shape),
        noise=dict(quick_shape),
        rate_fit=dict(quick_shape),
        gap=dict(quick_shape),
        advance_learning=dict(quick_shape),
    )
    return config
