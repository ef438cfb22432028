"""One protocol for every inverse-curvature solver, and the one place that picks a solver for a config.

Each solver computes s = (C + λI)⁻¹ v for the rows of v and returns a ``Solution``
that names itself and reports its own convergence:

| solver | C | cost per query | converged means |
|---|---|---|---|
| ``lissa`` | Hessian or Gauss-Newton, sampled | depth × repeats batch products | the norm settled over the last tenth |
| ``cg`` | Hessian or Gauss-Newton, whole training set | up to max_iter full products | relative residual ≤ tol |
| ``ekfac`` / ``kfac`` | Gauss-Newton in Kronecker blocks, fitted once | four small matmuls per block | always (direct) |
| ``identity`` | none: s = v / λ, a gradient dot product | nothing | always |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import CGConfig, SolverConfig
from ..errors import LissaDivergedError
from .damping import damping_of, lissa_knobs
from .iterative import HVP, FusedStep, Solution, StepCallback, conjugate_gradient, lissa
from .kfac import GradientFactors, KroneckerFactors
from .spectrum import Spectrum


class InverseSolver(Protocol):
    name: str

    def solve(self, vectors: torch.Tensor, on_step: StepCallback | None = None) -> Solution: ...


@dataclass(frozen=True)
class CurvatureSource:
    """What the solvers may ask of a model's training set; the engine builds it once.

    ``batch_product(curvature)`` is LiSSA's ``hvp(indices, vectors, out)`` for that
    curvature, ``fused_step(curvature)`` its one-program step where there is one;
    ``full_product(curvature)`` applies it over the whole training set (CG);
    ``spectrum(curvature)`` and ``factors()`` are fitted on first use and kept.
    """

    num_train: int
    batch_product: Callable[[str], HVP]
    full_product: Callable[[str], Callable[[torch.Tensor], torch.Tensor]]
    spectrum: Callable[[str], Spectrum]
    factors: Callable[[], KroneckerFactors]
    decay: Sequence[float]  # per parameter position: the L2 term's weight decay, or 0
    fused_step: Callable[[str], FusedStep | None] = lambda curvature: None


@dataclass(frozen=True)
class LissaSolver:
    """LiSSA; with ``retries`` > 0 (knobs derived from the spectrum), a divergence is retried at 10× the scale.

    The scale derived from the mean curvature's largest eigenvalue can still be below a
    sampled batch's (at B = 1 one example's Gauss-Newton matrix is rank one with all of
    its trace in one eigenvalue), so a run at derived knobs that diverges starts again
    with scale × 10 and damp / 10: the same λ, the same fixed point, slower contraction.
    Knobs the caller gave exactly (FastIF's) are never changed: they fail with the error.
    """

    product: HVP
    num_train: int
    config: object  # LissaConfig
    name: str = "lissa"
    retries: int = 0
    fused_step: FusedStep | None = None

    def solve(self, vectors: torch.Tensor, on_step: StepCallback | None = None) -> Solution:
        config = self.config
        for attempt in range(self.retries + 1):
            try:
                solution = lissa(self.product, vectors, self.num_train, config, on_step, self.fused_step)
            except LissaDivergedError:
                if attempt == self.retries:
                    raise
                config = dataclasses.replace(config, damp=config.damp / 10, scale=config.scale * 10)
                continue
            solution.scale, solution.retries = config.scale, attempt
            return solution
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class ConjugateGradientSolver:
    product: Callable[[torch.Tensor], torch.Tensor]
    config: CGConfig
    name: str = "cg"

    def solve(self, vectors: torch.Tensor, on_step: StepCallback | None = None) -> Solution:
        return conjugate_gradient(self.product, vectors, self.config, on_step)


@dataclass(frozen=True)
class KroneckerSolver:
    """EK-FAC or K-FAC; ``damping`` is one λ, or one per parameter block (``damping_scope`` "block")."""

    factors: KroneckerFactors
    damping: float | tuple[float, ...]
    decay: Sequence[float]
    name: str = "ekfac"  # or "kfac"
    tolerance: float = 0.0  # the damped inverse's eigenvalues at low rank to this fraction (0: exactly)

    def solve(self, vectors: torch.Tensor, on_step: StepCallback | None = None,
              gradient_factors: Sequence[GradientFactors | None] | None = None) -> Solution:
        """The rows' blocks that came out of low rank are also kept as factors (``Solution.factors``);
        ``gradient_factors``: the rows' gradients' own factors where known (``KroneckerFactors.inverse_apply``)."""
        solved, factors = self.factors.inverse_apply(vectors, self.damping, self.decay, self.name, self.tolerance,
                                                     gradient_factors)
        if on_step is not None:
            on_step(1, 1)
        # A per-block λ is reported as its mean over the parameters.
        damping = self.damping if isinstance(self.damping, float) else float(
            sum(d * float(torch.Size(s).numel()) for d, s in zip(self.damping, self.factors.shapes)) / self.factors.num_params)
        return Solution(vectors=solved.to(vectors.dtype), converged=True, iterations=1, solver=self.name,
                        damping=damping, factors=factors)


@dataclass(frozen=True)
class IdentitySolver:
    damping: float
    name: str = "identity"

    def solve(self, vectors: torch.Tensor, on_step: StepCallback | None = None) -> Solution:
        if not self.damping > 0:
            raise ValueError("the identity solver needs a positive damping")
        return Solution(vectors=vectors / self.damping, converged=True, iterations=0, solver=self.name,
                        damping=self.damping)


def solver_for(config: SolverConfig, source: CurvatureSource) -> InverseSolver:
    """The solver that ``config`` names, with λ (and LiSSA's knobs) resolved against the curvature's spectrum."""
    if config.solver in ("ekfac", "kfac") and config.curvature != "gauss-newton":
        raise ValueError(f"{config.solver} approximates the Gauss-Newton matrix; use curvature 'gauss-newton'")
    if config.damping is None and config.damping_scope == "block":  # (SolverConfig allows it for ekfac and kfac only)
        factors = source.factors()
        dampings = tuple(config.damping_ratio * mean for mean in factors.block_means(config.solver))
        return KroneckerSolver(factors, dampings, source.decay, config.solver, config.inverse_rank_tolerance)
    relative = config.damping is None and not config.lissa_absolute
    spectrum = source.spectrum(config.curvature) if relative or (config.solver == "lissa" and not config.lissa_absolute) else None
    damping = damping_of(config, spectrum)
    if config.solver == "lissa":
        return LissaSolver(source.batch_product(config.curvature), source.num_train, lissa_knobs(config, damping, spectrum),
                           retries=0 if config.lissa_absolute else 3, fused_step=source.fused_step(config.curvature))
    if config.solver == "cg":
        cg = CGConfig(damping=damping, tol=config.cg_tol, max_iter=config.cg_max_iter)
        return ConjugateGradientSolver(source.full_product(config.curvature), cg)
    if config.solver in ("ekfac", "kfac"):
        return KroneckerSolver(source.factors(), damping, source.decay, config.solver, config.inverse_rank_tolerance)
    return IdentitySolver(damping)
