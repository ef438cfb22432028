"""λ and LiSSA's knobs from a SolverConfig and the curvature's spectrum.

A relative damping is λ = ratio × the whole curvature's mean eigenvalue (0.1 by
default, Kronfluence's heuristic; EK-FAC's per-block damping is resolved in
solvers.py from its own blocks). LiSSA's recursion ``h ← v + (1 − damp)h − C_B h / scale``
contracts when every eigenvalue μ of the sampled C_B satisfies 0 < damp + μ / scale < 2;
a sampled batch's eigenvalues can exceed the mean curvature's, so scale is set at
``LISSA_SCALE_MARGIN`` × (largest eigenvalue + λ) and damp = λ / scale, and a run that
still diverges is restarted at a larger scale by ``LissaSolver``.
"""

from __future__ import annotations

import dataclasses

from ..config import LissaConfig, SolverConfig
from .spectrum import Spectrum

LISSA_SCALE_MARGIN = 2.0


def damping_of(config: SolverConfig, spectrum: Spectrum | None) -> float:
    """The λ of (C + λI) that ``config`` asks for."""
    if config.damping is not None:
        return float(config.damping)
    if config.lissa_absolute:
        return config.lissa.damping
    if spectrum is None:
        raise ValueError("a relative damping needs the curvature's spectrum")
    mean = spectrum.mean
    if not mean > 0:
        raise ValueError(f"the {spectrum.curvature} curvature's mean eigenvalue is {mean:.3g}: give an absolute damping")
    return config.damping_ratio * mean


def lissa_knobs(config: SolverConfig, damping: float, spectrum: Spectrum | None) -> LissaConfig:
    """``config.lissa`` with damp and scale whose fixed point is (C + λI)⁻¹ v, scale above the largest eigenvalue."""
    if config.lissa_absolute:
        return config.lissa
    if spectrum is None or not spectrum.largest > 0:
        raise ValueError("LiSSA with a relative damping needs the curvature's largest eigenvalue")
    scale = LISSA_SCALE_MARGIN * (spectrum.largest + damping)
    return dataclasses.replace(config.lissa, damp=damping / scale, scale=scale)
