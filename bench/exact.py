"""Reference s_test by conjugate gradient on the whole training set's Hessian, several vectors at once.

The engine's own ``conjugate_gradient`` solves one vector at a time; here every
CG iteration applies H to all unconverged vectors in one pass over the training
set (``InfluenceEngine.full_hvp`` takes [m, P]: one forward and first gradient
per batch, then one second backward per vector), which is what the suites need
for 20 or more test inputs. Each vector keeps its own step sizes, so the result
is exactly CG per vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastif import InfluenceEngine


@dataclass
class CGResult:
    vectors: torch.Tensor  # [m, P]
    iterations: int
    residuals: list[float]  # final relative residual of each vector
    hvp_passes: int  # full passes over the training set


def top_eigenvalue(engine: InfluenceEngine, iterations: int = 12, seed: int = 0, batch_size: int = 64) -> float:
    """Power iteration on the full training Hessian (a handful of full passes): its largest |eigenvalue|."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, engine.num_params, generator=generator)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        hv = engine.full_hvp(v, batch_size)
        value = float((hv * v).sum())
        v = hv / hv.norm()
    return value


def batched_cg(engine: InfluenceEngine, vectors: torch.Tensor, damping: float, tol: float = 1e-4, max_iter: int = 100,
               batch_size: int = 64, on_iter: Callable[[int, float], None] | None = None) -> CGResult:
    """Solve ``(H + damping·I) x = v`` for every row of ``vectors``, H over all N training examples."""
    x = torch.zeros_like(vectors)
    r = vectors.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    norms = vectors.norm(dim=1).clamp_min(1e-30)
    active = (rs.sqrt() / norms) > tol
    iterations = passes = 0
    while bool(active.any()) and iterations < max_iter:
        rows = active.nonzero().flatten()
        Ap = engine.full_hvp(p[rows], batch_size) + damping * p[rows]
        passes += 1
        curvature = (p[rows] * Ap).sum(dim=1)
        alpha = rs[rows] / curvature
        x[rows] += alpha[:, None] * p[rows]
        r[rows] -= alpha[:, None] * Ap
        rs_new = (r[rows] * r[rows]).sum(dim=1)
        p[rows] = r[rows] + (rs_new / rs[rows])[:, None] * p[rows]
        rs[rows] = rs_new
        active[rows] = (rs_new.sqrt() / norms[rows]) > tol
        iterations += 1
        if on_iter:
            on_iter(iterations, float((rs.sqrt() / norms).max()))
    return CGResult(vectors=x, iterations=iterations, residuals=(rs.sqrt() / norms).tolist(), hvp_passes=passes)


def gradient_scores(engine: InfluenceEngine, indices, directions: torch.Tensor, chunk: int = 64,
                    on_step: Callable[[int], None] | None = None, norms: list | None = None) -> torch.Tensor:
    """``-⟨∇L(z_i), d⟩`` for every training index and every row d of ``directions``: [m, len(indices)].

    The same numbers as ``InfluenceEngine.score`` (which takes one JVP pass per direction),
    computed from each candidate's gradient once, so that many directions (LiSSA
    snapshots) cost one gradient per candidate plus a matrix product. ``norms``, when
    given, receives each candidate's gradient norm.
    """
    indices = [int(i) for i in indices]
    out = torch.zeros(len(directions), len(indices), dtype=torch.float64)
    for start in range(0, len(indices), chunk):
        rows = []
        for i in indices[start:start + chunk]:
            batch, hidden = engine.training_batch([i])
            rows.append(engine.objective.gradient(batch, hidden))
        grads = torch.stack(rows)
        out[:, start:start + len(rows)] = -(directions @ grads.T).double()
        if norms is not None:
            norms.extend(grads.norm(dim=1).tolist())
        if on_step:
            on_step(start + len(rows))
    return out


def cached_cg(engine: InfluenceEngine, cache_dir, keys: list[str], vectors: torch.Tensor, damping: float,
              tol: float = 1e-4, max_iter: int = 100, on_iter: Callable[[int, float], None] | None = None
              ) -> tuple[torch.Tensor, dict]:
    """``batched_cg`` with each solution kept on disk (``cache_dir``, numpy files) by model, input and settings.

    Returns (solutions [m, P], info): info says how many rows came from the cache, the
    CG iterations and full passes run now, and the worst final relative residual.
    """
    import hashlib
    from pathlib import Path

    import numpy as np

    folder = Path(cache_dir) if cache_dir is not None else None
    names = [hashlib.sha256(f"{engine.fingerprint}|{key}|{damping!r}|{tol!r}".encode()).hexdigest()[:24] + ".npy"
             for key in keys]
    found: list[torch.Tensor | None] = [None] * len(keys)
    if folder is not None:
        for row, name in enumerate(names):
            if (folder / name).is_file():
                found[row] = torch.from_numpy(np.load(folder / name))
    missing = [row for row, value in enumerate(found) if value is None]
    info = {"cached_rows": len(keys) - len(missing), "iterations": 0, "full_hvp_passes": 0, "max_residual": None}
    if missing:
        result = batched_cg(engine, vectors[missing], damping, tol=tol, max_iter=max_iter, on_iter=on_iter)
        info.update(iterations=result.iterations, full_hvp_passes=result.hvp_passes, max_residual=max(result.residuals))
        for row, solution in zip(missing, result.vectors):
            found[row] = solution
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / names[row], solution.numpy())
    return torch.stack(found), info
