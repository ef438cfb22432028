"""The iterative inverse-curvature solvers: s = (C + λI)⁻¹ v for one or several vectors at once.

LiSSA takes a ``product(indices, vectors)`` callable that returns C_batch · v for the
training examples ``indices``, CG one that applies C over the whole training set, so
both are independent of how the model runs and of which curvature C is (the Hessian
or the Gauss-Newton matrix, fastif/objective.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import CGConfig, LissaConfig
from ..errors import CancelledError, LissaDivergedError

HVP = Callable[..., torch.Tensor]
"""``hvp(indices, vectors, out=None)``: H_batch · v for each row of ``vectors``; it may write into ``out``."""
FusedStep = Callable[[Sequence[int], torch.Tensor, torch.Tensor, float, float], "tuple[torch.Tensor, float] | None"]
"""``fused_step(indices, h, vectors, damp, scale)``: LiSSA's updated ``h`` and its largest row norm from one
program (the compiled H·v, fastif/compiled.py), or None to decline for this batch."""
StepCallback = Callable[[int, int], bool]
"""Called as ``on_step(done, total)``; returning True asks the solver to stop (cancellation)."""


@dataclass
class Solution:
    """What a solver returns: the solved rows and its own account of how well it solved them."""

    vectors: torch.Tensor  # [m, P]
    converged: bool
    norms: list[float] = field(default_factory=list)  # ‖estimate‖ of row 0 along the run (LiSSA)
    iterations: int = 0
    solver: str = ""
    damping: float = 0.0  # the λ actually used
    residual: float | None = None  # CG: the largest relative residual ‖v − (C + λI)x‖ / ‖v‖ over the rows
    scale: float | None = None  # LiSSA: the scale it ran at
    retries: int = 0  # LiSSA at derived knobs: how many times it restarted at 10× the scale
    # EK-FAC and K-FAC: per row, its blocks that are of low rank, as factors (fastif/curvature/kfac.py ``RowFactors``)
    factors: list[dict] | None = None

    def diagnostics(self) -> dict:
        """The fields a result reports about its s_test."""
        out = {"solver": self.solver, "converged": bool(self.converged), "iterations": int(self.iterations),
               "damping": float(self.damping)}
        if self.residual is not None:
            out["relative_residual"] = float(self.residual)
        if self.scale is not None:
            out["lissa_scale"] = float(self.scale)
            out["lissa_retries"] = int(self.retries)
        return out


def lissa_generator(seed: int, repeat: int) -> torch.Generator:
    """The sampling stream of one LiSSA repeat; parallel shard w runs with ``seed + w``."""
    return torch.Generator().manual_seed(seed * 7919 + repeat)


def lissa(
    hvp: HVP,
    vectors: torch.Tensor,
    num_train: int,
    config: LissaConfig,
    on_step: StepCallback | None = None,
    fused_step: FusedStep | None = None,
) -> Solution:
    """FastIF's LiSSA: ``h ← v + (1 − damp)·h − H_B h / scale``, then ``s = h / scale``.

    Each of the ``depth`` steps samples ``batch_size`` training examples; the
    ``repeats`` runs use independent streams and are averaged. The estimate of a
    positive semi-definite H stays below ‖v‖ / damp in norm. Negative curvature
    (an under-trained model) can push it higher, so the alarm sits at 1000× that:
    past it (or at NaN) the recursion is diverging geometrically, which happens when
    ``scale`` is smaller than H's largest eigenvalue.
    """
    total_steps = config.depth * config.repeats
    estimates = torch.zeros_like(vectors)
    limit = 1000.0 * vectors.norm(dim=1).max().item() / config.damp
    norms: list[float] = []
    stable = True
    # In place, into buffers reused at every step: at B = 1 the vector arithmetic and
    # fresh [m, P] allocations would be a visible share of a step.
    curvature = torch.empty_like(vectors)
    for repeat in range(config.repeats):
        generator = lissa_generator(config.seed, repeat)
        h = vectors.clone()
        window: list[float] = []
        for step in range(config.depth):
            indices = torch.randint(num_train, (config.batch_size,), generator=generator).tolist()
            fused = fused_step(indices, h, vectors, config.damp, config.scale) if fused_step else None
            if fused is not None:
                h, norm = fused
            else:
                curvature = hvp(indices, h, out=curvature)  # before h changes in place
                torch.add(vectors, h, alpha=1.0 - config.damp, out=h)
                h.sub_(curvature, alpha=1.0 / config.scale)
                norm = h.norm(dim=1).max().item()
            if not math.isfinite(norm) or norm > limit:
                raise LissaDivergedError(
                    f"LiSSA diverged at step {step + 1} of {config.depth} (‖h‖ = {norm:.3g}, bound {limit:.3g}): "
                    f"raise 'scale' above the Hessian's largest eigenvalue (now {config.scale:g}, try {config.scale * 10:g}) "
                    f"or raise 'damp' (now {config.damp:g})"
                )
            if repeat == 0:
                norms.append(norm)
            window.append(norm)
            if on_step is not None and on_step(repeat * config.depth + step + 1, total_steps):
                raise CancelledError("cancelled during LiSSA")
        stable = stable and _settled(window)
        estimates += h / config.scale
    return Solution(vectors=estimates / config.repeats, converged=stable, norms=norms, iterations=total_steps,
                    solver="lissa", damping=config.damping)


def _settled(norms: list[float]) -> bool:
    """The norm over the last tenth of the run moved by under 5% from the tenth before it."""
    tenth = max(1, len(norms) // 10)
    if len(norms) < 2 * tenth or len(norms) < 4:
        return False
    last = sum(norms[-tenth:]) / tenth
    before = sum(norms[-2 * tenth : -tenth]) / tenth
    return abs(last - before) <= 0.05 * max(before, 1e-30)


def conjugate_gradient(
    full_hvp: Callable[[torch.Tensor], torch.Tensor],
    vectors: torch.Tensor,
    config: CGConfig,
    on_step: StepCallback | None = None,
) -> Solution:
    """Solve ``(H + damping·I) x = v`` per row to a relative residual of ``tol``.

    ``full_hvp`` must apply the curvature of the mean loss over the whole training
    set. CG assumes C + λI is positive definite (always true of the Gauss-Newton
    matrix for λ > 0); a direction of non-positive curvature (an indefinite Hessian
    at small λ) stops it early with ``converged=False``.
    """
    solutions, all_converged, iterations, worst = [], True, 0, 0.0  # iterations: the most any row took
    for v in vectors:
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = torch.dot(r, r)
        target = (config.tol * v.norm()) ** 2
        converged = bool(rs <= target)
        for step in range(config.max_iter):
            if converged:
                break
            Ap = full_hvp(p.unsqueeze(0))[0] + config.damping * p
            curvature = torch.dot(p, Ap)
            if curvature <= 0:
                break
            alpha = rs / curvature
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.dot(r, r)
            iterations = max(iterations, step + 1)
            if on_step is not None and on_step(step + 1, config.max_iter):
                raise CancelledError("cancelled during conjugate gradient")
            converged = bool(rs_new <= target)
            p = r + (rs_new / rs) * p
            rs = rs_new
        all_converged = all_converged and converged
        worst = max(worst, float(rs.sqrt() / v.norm().clamp_min(1e-30)))
        solutions.append(x)
    return Solution(vectors=torch.stack(solutions), converged=all_converged, iterations=iterations, solver="cg",
                    damping=config.damping, residual=worst)
