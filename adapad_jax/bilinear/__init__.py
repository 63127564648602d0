"""Parallel deflation on bilinear regression (paper Algorithm 1, Appendix F)."""

from adapad_jax.bilinear.deflation import (
    COMPONENTS_AXIS,
    DeflationSettings,
    DeflationTrace,
    Schedule,
    activation_rounds,
    make_schedule,
    run_deflation,
    run_deflation_seeds,
)
from adapad_jax.bilinear.diagnostics import Diagnostics, diagnose, ideal_components, relative_weight_error, top_rank1
from adapad_jax.bilinear.problems import BilinearProblem, ProblemStatistics, make_problem, problem_statistics, spectrum
from adapad_jax.bilinear.subroutines import als_left, als_right, als_step, gd_step, project, run_rank1

__all__ = [
    "COMPONENTS_AXIS", "BilinearProblem", "DeflationSettings", "DeflationTrace", "Diagnostics",
    "ProblemStatistics", "Schedule", "activation_rounds", "als_left", "als_right", "als_step",
    "diagnose", "gd_step", "ideal_components", "make_problem", "make_schedule", "problem_statistics",
    "project", "relative_weight_error", "run_deflation", "run_deflation_seeds", "run_rank1", "spectrum",
    "top_rank1",
]
