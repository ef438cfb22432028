"""Curvature of the training objective and the solvers that invert it.

- ``iterative``: LiSSA and conjugate gradient over curvature products;
- ``spectrum``: the curvature's largest and mean eigenvalue from a few dozen products;
- ``damping``: λ and LiSSA's knobs relative to that spectrum;
- ``kfac``: K-FAC / EK-FAC factors, fitted once per model, applied in a few matmuls;
- ``solvers``: the one protocol and ``solver_for``, the one place a config becomes a solver.
"""

from .iterative import Solution, conjugate_gradient, lissa, lissa_generator
from .kfac import KroneckerFactors, fit_factors
from .solvers import CurvatureSource, InverseSolver, solver_for
from .spectrum import Spectrum, estimate_spectrum

__all__ = ["CurvatureSource", "InverseSolver", "KroneckerFactors", "Solution", "Spectrum", "conjugate_gradient",
           "estimate_spectrum", "fit_factors", "lissa", "lissa_generator", "solver_for"]
