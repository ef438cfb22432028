"""Curvature of the training objective and the solvers that invert it.

- ``iterative``: LiSSA and conjugate gradient over curvature products;
- ``spectrum``: the curvature's largest and mean eigenvalue from a few dozen products;
- ``damping``: λ and LiSSA's knobs relative to that spectrum;
- ``kfac``: K-FAC / EK-FAC factors, applied in a few matmuls, saved and loaded;
- ``kfac_fit``: fitting those factors once per model, from a tape of the parameters' uses;
- ``solvers``: the one protocol and ``solver_for``, the one place a config becomes a solver.
"""

from .iterative import Solution, conjugate_gradient, lissa, lissa_generator
from .kfac import KroneckerFactors
from .kfac_fit import EIGENVALUE_PARTS, FactorFit, combined_factors
from .solvers import CurvatureSource, InverseSolver, solver_for
from .spectrum import Spectrum, estimate_spectrum

__all__ = ["EIGENVALUE_PARTS", "CurvatureSource", "FactorFit", "InverseSolver", "KroneckerFactors", "Solution", "Spectrum",
           "combined_factors", "conjugate_gradient", "estimate_spectrum", "lissa", "lissa_generator", "solver_for"]
