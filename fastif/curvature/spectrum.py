"""The curvature's spectrum from a few dozen products: largest eigenvalue (Lanczos) and mean eigenvalue (Hutchinson).

Damping and LiSSA's scale are set relative to these (fastif/curvature/damping.py):
an absolute λ means nothing until it is compared with the eigenvalues it is added
to. FastIF's λ = 50 on MiniLM, whose Hessian's eigenvalues lie between about −0.6
and 27, swamps the curvature and leaves little more than a gradient dot product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

Product = Callable[[torch.Tensor], torch.Tensor]
"""``product(vectors [m, P]) -> C · vectors``, C the curvature of the mean loss over a fixed set of examples."""


@dataclass(frozen=True)
class Spectrum:
    """What is known of one curvature matrix C (L2 term included) of one model.

    ``largest`` and ``smallest`` are the extreme Ritz values of ``lanczos_steps`` Lanczos
    steps (the largest converges first; ``smallest`` is only an upper bound on the true
    smallest eigenvalue); ``mean`` is the trace over the number of parameters, by
    Hutchinson's estimator with ``probes`` Rademacher vectors (``trace_stderr`` its
    standard error); all over the curvature of ``examples`` training examples.
    """

    curvature: str
    largest: float
    smallest: float
    mean: float
    trace: float
    trace_stderr: float
    num_params: int
    examples: int
    lanczos_steps: int
    probes: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Spectrum:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


def lanczos_extremes(product: Product, num_params: int, steps: int, seed: int = 0,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """The largest and smallest Ritz values of ``steps`` Lanczos steps with full reorthogonalisation.

    Full reorthogonalisation keeps the Krylov basis orthonormal in float32 (without it
    the largest eigenvalue reappears as spurious copies); the basis costs steps × P numbers.
    """
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(num_params, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(min(steps, num_params)):
        w = product(basis[-1].unsqueeze(0))[0].to(dtype)
        alpha = float(torch.dot(w, basis[-1]))
        alphas.append(alpha)
        for b in basis:  # twice is enough (Kahan): once for the recursion, once for rounding
            w -= torch.dot(w, b) * b
        for b in basis:
            w -= torch.dot(w, b) * b
        beta = float(w.norm())
        if step == steps - 1 or beta < 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    ritz = np.linalg.eigvalsh(tridiagonal)
    return float(ritz[-1]), float(ritz[0])


def hutchinson_trace(product: Product, num_params: int, probes: int, seed: int = 0,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     batch: int = 4) -> tuple[float, float]:
    """tr(C) ≈ mean of zᵀ C z over Rademacher vectors z; (estimate, its standard error)."""
    generator = torch.Generator().manual_seed(seed + 1)
    samples: list[float] = []
    for start in range(0, probes, batch):
        count = min(batch, probes - start)
        z = (torch.randint(0, 2, (count, num_params), generator=generator) * 2 - 1).to(device=device, dtype=dtype)
        samples.extend((z * product(z)).sum(dim=1).double().cpu().tolist())
    values = np.asarray(samples)
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), stderr


def estimate_spectrum(product: Product, num_params: int, curvature: str, examples: int, lanczos_steps: int = 20,
                      probes: int = 16, seed: int = 0, device: torch.device | str = "cpu") -> Spectrum:
    largest, smallest = lanczos_extremes(product, num_params, lanczos_steps, seed, device)
    trace, stderr = hutchinson_trace(product, num_params, probes, seed, device)
    return Spectrum(curvature=curvature, largest=largest, smallest=smallest, mean=trace / num_params, trace=trace,
                    trace_stderr=stderr, num_params=num_params, examples=examples, lanczos_steps=lanczos_steps,
                    probes=probes)
