"""The inverse-curvature solvers (fastif/curvature/) against explicit matrices and naive loops.

No model is involved: every product is an explicit float64 matrix the test holds, so each
solver's answer is checked against ``torch.linalg.solve`` or a step-by-step reimplementation
of its recursion on the very indices it sampled. Fast enough to run under mutation testing.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastif.config import CGConfig, LissaConfig, SolverConfig
from fastif.curvature import damping as damping_module
from fastif.curvature.damping import LISSA_SCALE_MARGIN, damping_of, lissa_knobs
from fastif.curvature.iterative import Solution, _settled, conjugate_gradient, lissa, lissa_generator
from fastif.curvature.kfac import KroneckerFactors
from fastif.curvature.solvers import (ConjugateGradientSolver, CurvatureSource, IdentitySolver, KroneckerSolver,
                                      LissaSolver, solver_for)
from fastif.curvature.spectrum import Spectrum, estimate_spectrum, hutchinson_trace, lanczos_extremes
from fastif.errors import CancelledError, LissaDivergedError

P = 6


def spd(size: int, low: float, high: float, seed: int) -> torch.Tensor:
    """A symmetric matrix with eigenvalues spread evenly over [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, size, dtype=torch.float64)) @ q.T


def vectors(rows: int, seed: int = 1, size: int = P) -> torch.Tensor:
    return torch.randn(rows, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class PerExample:
    """C_B · v with C_B the mean of per-example matrices over the sampled batch; records every batch."""

    def __init__(self, matrices: torch.Tensor):
        self.matrices = matrices
        self.batches: list[list[int]] = []

    def __call__(self, indices, vecs, out=None):
        self.batches.append(list(indices))
        return vecs @ self.matrices[indices].mean(0).T


def spectrum(largest: float = 4.0, mean: float = 2.0, curvature: str = "gauss-newton") -> Spectrum:
    return Spectrum(curvature=curvature, largest=largest, smallest=0.1, mean=mean, trace=mean * P, trace_stderr=0.0,
                    num_params=P, examples=10, lanczos_steps=20, probes=16)


# -- LiSSA ------------------------------------------------------------------------------------------
def test_lissa_reaches_the_damped_inverse_of_a_fixed_matrix():
    h = spd(P, 0.5, 3.0, seed=0)
    v = vectors(2)
    config = LissaConfig(damp=0.05, scale=4.0, depth=600, batch_size=1, seed=3)
    solution = lissa(lambda idx, x, out=None: x @ h.T, v, 10, config)
    expected = torch.linalg.solve(h + config.damping * torch.eye(P, dtype=torch.float64), v.T).T
    torch.testing.assert_close(solution.vectors, expected, rtol=1e-8, atol=1e-10)
    assert solution.converged and solution.solver == "lissa"
    assert solution.iterations == 600 and solution.damping == pytest.approx(0.2)
    assert len(solution.norms) == 600


def test_lissa_is_linear_in_the_vector_whatever_its_norm():
    h = spd(P, 0.5, 3.0, seed=0)
    v = vectors(2)
    config = LissaConfig(damp=0.01, scale=4.0, depth=50)
    small = lissa(lambda idx, x, out=None: x @ h.T, v, 10, config).vectors
    large = lissa(lambda idx, x, out=None: x @ h.T, 1000.0 * v, 10, config).vectors  # ‖h‖ far above 1000
    torch.testing.assert_close(large, 1000.0 * small, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("repeats", [1, 3])
def test_lissa_is_the_recursion_on_the_batches_it_sampled(repeats):
    """A naive loop over the recorded batches gives the same estimate, every row and every step norm."""
    matrices = torch.stack([spd(P, 0.1, 2.0 + i, seed=10 + i) for i in range(7)])
    product = PerExample(matrices)
    v = vectors(3, seed=4)
    config = LissaConfig(damp=0.1, scale=6.0, depth=9, batch_size=2, repeats=repeats, seed=5)
    solution = lissa(product, v, 7, config)
    assert len(product.batches) == 9 * repeats and all(len(b) == 2 for b in product.batches)
    assert all(0 <= i < 7 for b in product.batches for i in b)
    total = torch.zeros_like(v)
    norms = []
    for r in range(repeats):
        h = v.clone()
        for step in range(9):
            c = matrices[product.batches[r * 9 + step]].mean(0)
            h = v + (1 - config.damp) * h - (h @ c.T) / config.scale
            if r == 0:
                norms.append(float(h.norm(dim=1).max()))
        total += h / config.scale
    torch.testing.assert_close(solution.vectors, total / repeats, rtol=1e-12, atol=1e-12)
    assert solution.norms == pytest.approx(norms, rel=1e-12)
    assert solution.iterations == 9 * repeats
    assert not solution.converged  # 9 steps cannot show a settled norm (the last tenth is one step)


def test_lissa_streams_are_seeded_and_distinct_per_seed_and_repeat():
    def draws(seed, repeat):
        return torch.randint(1000, (12,), generator=lissa_generator(seed, repeat)).tolist()

    assert draws(4, 0) == draws(4, 0)
    seen = {(s, r): tuple(draws(s, r)) for s in range(4) for r in range(3)}
    assert len(set(seen.values())) == len(seen)  # shard w's seed + w never replays another shard's repeat
    product = PerExample(torch.stack([spd(P, 0.1, 1.0, seed=i) for i in range(50)]))
    lissa(product, vectors(1), 50, LissaConfig(damp=0.1, scale=2.0, depth=5, repeats=2, seed=2))
    for repeat in range(2):
        stream = lissa_generator(2, repeat)
        expected = [torch.randint(50, (1,), generator=stream).tolist() for _ in range(5)]
        assert product.batches[repeat * 5 : repeat * 5 + 5] == expected  # repeat r draws from stream (seed, r)


def test_lissa_of_the_same_seed_is_identical_and_of_another_seed_differs():
    matrices = torch.stack([spd(P, 0.1, 3.0, seed=i) for i in range(20)])
    v = vectors(2)
    a = lissa(PerExample(matrices), v, 20, LissaConfig(damp=0.1, scale=5.0, depth=30, seed=1)).vectors
    b = lissa(PerExample(matrices), v, 20, LissaConfig(damp=0.1, scale=5.0, depth=30, seed=1)).vectors
    c = lissa(PerExample(matrices), v, 20, LissaConfig(damp=0.1, scale=5.0, depth=30, seed=2)).vectors
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_lissa_settles_on_a_long_run_and_not_on_a_short_one():
    h = spd(P, 0.5, 2.0, seed=2)
    long = lissa(lambda i, x, out=None: x @ h.T, vectors(1), 5, LissaConfig(damp=0.1, scale=3.0, depth=200))
    flat = spd(P, 0.001, 0.002, seed=2)  # almost no curvature: h grows by about v every step
    short = lissa(lambda i, x, out=None: x @ flat.T, vectors(1), 5, LissaConfig(damp=0.001, scale=3.0, depth=40))
    assert long.converged and not short.converged


def test_lissa_reports_every_step_and_stops_when_asked():
    calls = []
    h = spd(P, 0.5, 2.0, seed=2)
    lissa(lambda i, x, out=None: x @ h.T, vectors(1), 5, LissaConfig(damp=0.1, scale=3.0, depth=4, repeats=2),
          on_step=lambda done, total: calls.append((done, total)) and False)
    assert calls == [(n, 8) for n in range(1, 9)]
    product = PerExample(h.unsqueeze(0))
    with pytest.raises(CancelledError):
        lissa(product, vectors(1), 1, LissaConfig(damp=0.1, scale=3.0, depth=50), on_step=lambda done, total: done >= 5)
    assert len(product.batches) == 5


def test_lissa_uses_a_fused_step_when_offered_and_the_plain_product_when_declined():
    matrices = torch.stack([spd(P, 0.5, 2.0 + i, seed=7 + i) for i in range(4)])
    config = LissaConfig(damp=0.1, scale=3.0, depth=25, batch_size=2)
    v = vectors(2)
    plain = lissa(PerExample(matrices), v, 4, config)

    class Fused:
        def __init__(self, accept: bool):
            self.accept, self.fused, self.plain = accept, 0, 0

        def __call__(self, indices, x, out=None):
            self.plain += 1
            return x @ matrices[indices].mean(0).T

        def fused_step(self, indices, state, vecs, damp, scale):
            if not self.accept:
                return None
            self.fused += 1
            new = vecs + (1 - damp) * state - (state @ matrices[indices].mean(0).T) / scale
            return new, float(new.norm(dim=1).max())

    for accept in (True, False):
        hvp = Fused(accept)
        solution = lissa(hvp, v, 4, config, fused_step=hvp.fused_step)
        torch.testing.assert_close(solution.vectors, plain.vectors, rtol=1e-12, atol=1e-14)
        assert solution.norms == pytest.approx(plain.norms, rel=1e-12)
        assert (hvp.fused, hvp.plain) == ((25, 0) if accept else (0, 25))


def test_lissa_below_the_largest_eigenvalue_diverges_loudly():
    h = spd(P, 1.0, 60.0, seed=3)
    with pytest.raises(LissaDivergedError):
        lissa(lambda i, x, out=None: x @ h.T, vectors(1), 3, LissaConfig(damp=0.01, scale=5.0, depth=400))
    with pytest.raises(LissaDivergedError):  # NaN is a divergence too, at the first step
        lissa(lambda i, x, out=None: x * float("nan"), vectors(1), 3, LissaConfig(damp=0.01, scale=5.0, depth=3))
    # Negative curvature growing the estimate well past ‖v‖ / damp but under the alarm is not a divergence.
    grow = -0.02 * torch.eye(P, dtype=torch.float64)
    solution = lissa(lambda i, x, out=None: x @ grow.T, vectors(1), 3, LissaConfig(damp=0.001, scale=1.0, depth=300))
    assert max(solution.norms) > 2 * float(vectors(1).norm()) and torch.isfinite(solution.vectors).all()


@pytest.mark.parametrize(("norms", "settled"), [
    ([1.0] * 4, True),
    ([1.0] * 40, True),
    ([1.0] * 3, False),
    ([1.0] * 36 + [1.06] * 4, False),
    ([1.0] * 36 + [1.04] * 4, True),
    ([1.0] * 36 + [0.94] * 4, False),
    ([5.0] * 34 + [1.0] * 6, False),  # the tenth before the last straddles the drop
    ([1.0] * 20 + [2.0, 2.0, 2.0, 2.0] + [2.0] * 4, True),
    ([0.0] * 10, True),
    ([1.0, 2.0, 1.0, 2.0], False),
    ([10.0] * 36 + [10.4] * 4, True),  # the 5% is relative to the norm before
    ([10.0] * 36 + [10.6] * 4, False),
    ([0.1] * 36 + [0.104] * 4, True),
    ([0.1] * 36 + [0.11] * 4, False),  # small norms too: 10% is not settled
])
def test_settled_compares_the_last_tenth_with_the_tenth_before(norms, settled):
    assert _settled(norms) is settled


def test_settled_windows_are_tenths_of_the_run():
    run = [3.0] * 80 + [1.0] * 10 + [1.0] * 10  # 100 steps: the last two tenths agree, whatever came before
    assert _settled(run)
    run = [1.0] * 80 + [3.0] * 10 + [1.0] * 10
    assert not _settled(run)
    run = [1.0] * 89 + [3.0] + [1.0] * 10  # one step of ten in the tenth before: the mean moved by 20%
    assert not _settled(run)


# -- conjugate gradient -----------------------------------------------------------------------------
def test_cg_solves_the_damped_system_row_by_row():
    a = spd(P, 0.2, 5.0, seed=4)
    v = vectors(3, seed=6)
    solution = conjugate_gradient(lambda x: x @ a.T, v, CGConfig(damping=0.3, tol=1e-10, max_iter=50))
    expected = torch.linalg.solve(a + 0.3 * torch.eye(P, dtype=torch.float64), v.T).T
    torch.testing.assert_close(solution.vectors, expected, rtol=1e-8, atol=1e-10)
    assert solution.converged and solution.solver == "cg" and solution.damping == 0.3
    assert 1 <= solution.iterations <= P + 1
    assert solution.residual <= 1e-10


def test_cg_reports_its_true_residual_and_the_most_iterations_of_any_row():
    a = spd(P, 0.2, 5.0, seed=4)
    eigenvalues, eigenvectors = torch.linalg.eigh(a)
    easy = eigenvectors[:, 2]  # one CG step solves an eigenvector exactly
    v = torch.stack([easy, vectors(1, seed=9)[0]])
    config = CGConfig(damping=0.1, tol=1e-9, max_iter=2)
    solution = conjugate_gradient(lambda x: x @ a.T, v, config)
    assert not solution.converged and solution.iterations == 2
    system = a + 0.1 * torch.eye(P, dtype=torch.float64)
    residuals = [float((row - system @ x).norm() / row.norm()) for row, x in zip(v, solution.vectors)]
    assert residuals[0] < 1e-9 < residuals[1]
    assert solution.residual == pytest.approx(max(residuals), rel=1e-6)
    easy_only = conjugate_gradient(lambda x: x @ a.T, v[:1], CGConfig(damping=0.1, tol=1e-9, max_iter=50))
    assert easy_only.converged and easy_only.iterations == 1
    torch.testing.assert_close(easy_only.vectors[0], easy / (eigenvalues[2] + 0.1), rtol=1e-9, atol=1e-12)


def test_cg_stops_at_a_residual_relative_to_the_vector():
    a = spd(P, 1.0, 1.5, seed=6)
    v = vectors(1, seed=2)
    runs = [conjugate_gradient(lambda x: x @ a.T, scale * v, CGConfig(damping=0.0, tol=0.05, max_iter=20))
            for scale in (1e-3, 1.0, 1e3)]
    assert all(r.converged for r in runs) and len({r.iterations for r in runs}) == 1
    assert all(r.residual <= 0.05 for r in runs)
    assert runs[0].residual == pytest.approx(runs[1].residual, rel=1e-5)  # relative, whatever the vector's norm
    assert runs[1].iterations < P  # a loose tolerance stops early
    steps = []
    ConjugateGradientSolver(lambda x: x @ a.T, CGConfig(damping=0.0, tol=1e-12, max_iter=3)).solve(
        v, lambda done, total: steps.append(done) and False)
    assert steps == [1, 2, 3]


def test_cg_of_a_zero_vector_is_zero_without_a_product():
    calls = []
    solution = conjugate_gradient(lambda x: calls.append(1) or x, torch.zeros(1, P, dtype=torch.float64),
                                  CGConfig(damping=1.0, tol=1e-6, max_iter=10))
    assert calls == [] and solution.converged and solution.iterations == 0
    assert torch.equal(solution.vectors, torch.zeros(1, P, dtype=torch.float64))


def test_cg_stops_at_zero_curvature_instead_of_dividing_by_it():
    singular = torch.diag(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    v = torch.zeros(1, P, dtype=torch.float64)
    v[0, 0] = 1.0  # all of it in the null space
    solution = conjugate_gradient(lambda x: x @ singular.T, v, CGConfig(damping=0.0, tol=1e-8, max_iter=10))
    assert not solution.converged and torch.equal(solution.vectors, torch.zeros(1, P, dtype=torch.float64))


def test_cg_stops_at_negative_curvature_and_says_so():
    indefinite = torch.diag(torch.tensor([-4.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    v = torch.ones(1, P, dtype=torch.float64)
    v[0, 0] = 10.0  # the first direction is mostly the negative one
    solution = conjugate_gradient(lambda x: x @ indefinite.T, v, CGConfig(damping=0.0, tol=1e-10, max_iter=50))
    assert not solution.converged and torch.isfinite(solution.vectors).all()
    assert solution.iterations == 0  # the very first direction has pᵀAp < 0


def test_cg_reports_every_step_and_stops_when_asked():
    a = spd(P, 0.2, 5.0, seed=4)
    calls = []
    conjugate_gradient(lambda x: x @ a.T, vectors(1), CGConfig(damping=0.1, tol=1e-12, max_iter=3),
                       on_step=lambda done, total: calls.append((done, total)) and False)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(CancelledError):
        conjugate_gradient(lambda x: x @ a.T, vectors(1), CGConfig(damping=0.1, tol=1e-12, max_iter=30),
                           on_step=lambda done, total: done == 2)


def test_solution_diagnostics_name_what_each_solver_measured():
    assert Solution(vectors=torch.zeros(1, 1), converged=True, iterations=3, solver="cg", damping=2,
                    residual=0.5).diagnostics() == {"solver": "cg", "converged": True, "iterations": 3, "damping": 2.0,
                                                    "relative_residual": 0.5}
    assert Solution(vectors=torch.zeros(1, 1), converged=False, iterations=7, solver="lissa", damping=1.5,
                    scale=30, retries=2).diagnostics() == {"solver": "lissa", "converged": False, "iterations": 7,
                                                           "damping": 1.5, "lissa_scale": 30.0, "lissa_retries": 2}
    plain = Solution(vectors=torch.zeros(1, 1), converged=True, solver="identity", damping=0.25).diagnostics()
    assert plain == {"solver": "identity", "converged": True, "iterations": 0, "damping": 0.25}


# -- damping and LiSSA's knobs ------------------------------------------------------------------------
def test_damping_is_absolute_or_a_multiple_of_the_mean_eigenvalue():
    assert damping_of(SolverConfig(solver="cg", damping=0.7), None) == 0.7
    assert damping_of(SolverConfig(solver="cg", damping=0.0), None) == 0.0
    paper = SolverConfig.fastif_paper()
    assert damping_of(paper, None) == pytest.approx(50.0)
    assert damping_of(SolverConfig(solver="cg", damping_ratio=0.3), spectrum(mean=0.5)) == pytest.approx(0.15)
    assert damping_of(SolverConfig(solver="lissa"), spectrum(mean=2.0)) == pytest.approx(0.2)  # default 0.1
    with pytest.raises(ValueError):
        damping_of(SolverConfig(solver="cg"), None)
    for mean in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            damping_of(SolverConfig(solver="cg"), spectrum(mean=mean))


def test_lissa_knobs_put_scale_above_the_largest_eigenvalue_with_the_same_fixed_point():
    config = SolverConfig(solver="lissa", lissa=LissaConfig(depth=77, batch_size=3, repeats=2, seed=9))
    knobs = lissa_knobs(config, 0.4, spectrum(largest=0.6))
    assert LISSA_SCALE_MARGIN == 2.0
    assert knobs.scale == pytest.approx(2.0 * (0.6 + 0.4))
    assert knobs.damp * knobs.scale == pytest.approx(0.4)
    assert (knobs.depth, knobs.batch_size, knobs.repeats, knobs.seed) == (77, 3, 2, 9)
    paper = SolverConfig.fastif_paper(depth=5)
    assert lissa_knobs(paper, 50.0, None) is paper.lissa
    for bad in (None, spectrum(largest=0.0), spectrum(largest=-2.0)):
        with pytest.raises(ValueError):
            lissa_knobs(config, 0.4, bad)
    assert damping_module.lissa_knobs is lissa_knobs


# -- the solvers behind the protocol ------------------------------------------------------------------
def test_lissa_solver_restarts_at_ten_times_the_scale_with_the_same_fixed_point():
    h = spd(P, 5.0, 30.0, seed=5)
    v = vectors(1)
    calls = []

    def product(idx, x, out=None):
        calls.append(1)
        return x @ h.T

    config = LissaConfig(damp=0.1, scale=10.0, depth=500)  # λ = 1: damp + 30 / 10 > 2 diverges
    solution = LissaSolver(product, 4, config, retries=3).solve(v)
    assert solution.retries == 1 and solution.scale == pytest.approx(100.0)
    expected = torch.linalg.solve(h + torch.eye(P, dtype=torch.float64), v.T).T
    torch.testing.assert_close(solution.vectors, expected, rtol=1e-6, atol=1e-9)
    assert solution.damping == pytest.approx(1.0)
    with pytest.raises(LissaDivergedError):
        LissaSolver(product, 4, config, retries=0).solve(v)
    calm = LissaSolver(product, 4, LissaConfig(damp=0.01, scale=100.0, depth=50), retries=3).solve(v)
    assert calm.retries == 0 and calm.scale == 100.0
    hopeless = spd(P, 5.0, 1e6, seed=5)
    with pytest.raises(LissaDivergedError):
        LissaSolver(lambda idx, x, out=None: x @ hopeless.T, 4, config, retries=2).solve(v)


def hand_made_factors(negative_eig: bool = False) -> KroneckerFactors:
    """Weight [3, 4] with its bias [3] joined as a fifth input column, a diagonal [4], an uncovered [2]."""
    g = torch.Generator().manual_seed(21)
    q_a, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    q_g, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    eig_a = torch.tensor([0.5, 1.0, 2.0, 3.0, -0.5 if negative_eig else 0.25], dtype=torch.float64)
    eig_g = torch.tensor([0.2, 1.5, 4.0], dtype=torch.float64)
    corrected = torch.rand(3, 5, generator=g, dtype=torch.float64) * 3 + 0.05
    from fastif.curvature.kfac import KroneckerBlock

    block = KroneckerBlock(q_a=q_a, eig_a=eig_a, q_g=q_g, eig_g=eig_g, corrected=corrected, bias=1)
    return KroneckerFactors(names=["w", "b", "ln", "u"], shapes=[(3, 4), (3,), (4,), (2,)], kronecker={0: block},
                            diagonal={2: torch.tensor([0.1, 0.7, 1.2, 2.5], dtype=torch.float64)}, examples=11,
                            uncovered=["u"])


def explicit_inverse(factors: KroneckerFactors, v: torch.Tensor, kind: str, dampings, decay) -> torch.Tensor:
    """(C + λI)⁻¹ v with C written out: (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ over vec([W | b]), diagonals, the mean."""
    block = factors.kronecker[0]
    lam = torch.outer(block.eig_g, block.eig_a).clamp_min(0) if kind == "kfac" else block.corrected
    basis = torch.kron(block.q_g, block.q_a)
    curvature = basis @ torch.diag(lam.reshape(-1)) @ basis.T
    trace = float(lam.sum()) + float(factors.diagonal[2].sum())
    mean = trace / (12 + 3 + 4)
    out = []
    for row in v:
        w, b, ln, u = row[:12].reshape(3, 4), row[12:15], row[15:19], row[19:21]
        joined = torch.cat([w, b[:, None]], dim=1).reshape(-1)
        shift = dampings[0] + decay[0]
        solved = torch.linalg.solve(curvature + shift * torch.eye(15, dtype=torch.float64), joined).reshape(3, 5)
        ln_solved = ln / (factors.diagonal[2] + dampings[2] + decay[2])
        u_solved = u / (mean + dampings[3] + decay[3])
        out.append(torch.cat([solved[:, :4].reshape(-1), solved[:, 4], ln_solved, u_solved]))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
@pytest.mark.parametrize("per_block", [False, True])
def test_kronecker_inverse_equals_the_explicit_block_inverse(kind, per_block):
    factors = hand_made_factors(negative_eig=True)
    v = vectors(2, seed=3, size=21)
    decay = [0.05, 0.0, 0.0, 0.02]
    dampings = [0.3, 0.3, 0.6, 0.9] if per_block else [0.4] * 4
    damping = tuple(dampings) if per_block else 0.4
    solved, _ = factors.inverse_apply(v, damping, decay, kind)
    torch.testing.assert_close(solved, explicit_inverse(factors, v, kind, dampings, decay), rtol=1e-9, atol=1e-12)


def test_kronecker_inverse_of_float32_vectors_runs_in_the_factors_precision():
    factors = hand_made_factors()
    v = vectors(2, seed=5, size=21)
    solved, _ = factors.inverse_apply(v.float(), 0.3, [0.0] * 4, "ekfac")
    assert solved.dtype == torch.float32
    torch.testing.assert_close(solved.double(), explicit_inverse(factors, v, "ekfac", [0.3] * 4, [0.0] * 4),
                               rtol=1e-5, atol=1e-6)


def test_mean_eigenvalue_of_a_single_covered_number():
    one = KroneckerFactors(names=["a", "u"], shapes=[(1,), (3,)], kronecker={},
                           diagonal={0: torch.tensor([2.5], dtype=torch.float64)}, examples=1, uncovered=["u"])
    assert one.mean_eigenvalue() == pytest.approx(2.5)
    none = KroneckerFactors(names=["u"], shapes=[(3,)], kronecker={}, diagonal={}, examples=1, uncovered=["u"])
    assert none.mean_eigenvalue() == 0.0


def test_kronecker_traces_means_and_joins():
    factors = hand_made_factors(negative_eig=True)
    block = factors.kronecker[0]
    assert factors.num_params == 21 and factors.joined == {1: 0}
    kfac_eigs = torch.outer(block.eig_g, block.eig_a).clamp_min(0)
    torch.testing.assert_close(block.eigenvalues("kfac"), kfac_eigs)
    assert float(block.eigenvalues("kfac").min()) == 0.0
    assert factors.trace("ekfac") == pytest.approx(float(block.corrected.sum()) + 4.5)
    assert factors.trace("kfac") == pytest.approx(float(kfac_eigs.sum()) + 4.5)
    assert factors.mean_eigenvalue("ekfac") == pytest.approx(factors.trace("ekfac") / 19)
    means = factors.block_means("ekfac")
    assert means == pytest.approx([float(block.corrected.mean())] * 2 + [4.5 / 4, factors.mean_eigenvalue("ekfac")])
    assert factors.block_means("kfac")[0] == pytest.approx(float(kfac_eigs.mean()))


def test_kronecker_factors_survive_saving_and_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray relative file (a path lost on the way) stays in this test's folder
    factors = hand_made_factors()
    path = tmp_path / "artefacts" / "fingerprint" / "ekfac.safetensors"  # folders that do not exist yet
    factors.save(path)
    factors.save(path)  # saving again over the same file (and into the same folder) is fine
    loaded = KroneckerFactors.load(path)
    assert loaded.names == factors.names and loaded.shapes == factors.shapes and loaded.examples == 11
    assert loaded.uncovered == ["u"] and loaded.joined == {1: 0} and set(loaded.diagonal) == {2}
    v = vectors(2, seed=8, size=21)
    for kind in ("ekfac", "kfac"):
        torch.testing.assert_close(loaded.inverse_apply(v, 0.2, [0.0] * 4, kind)[0], factors.inverse_apply(v, 0.2, [0.0] * 4, kind)[0])
    assert not path.with_name(path.name + ".partial").exists()
    assert KroneckerFactors.load(tmp_path / "absent.safetensors") is None
    from fastif.curvature import kfac

    monkeypatch.setattr(kfac, "FACTORS_VERSION", kfac.FACTORS_VERSION + 1)
    assert KroneckerFactors.load(path) is None


def test_kronecker_and_identity_solvers_answer_for_themselves():
    factors = hand_made_factors()
    v = vectors(1, seed=2, size=21)
    steps = []
    solution = KroneckerSolver(factors, (0.1, 0.1, 0.5, 1.0), [0.0] * 4, "kfac").solve(v, lambda d, t: steps.append((d, t)))
    assert steps == [(1, 1)] and solution.converged and solution.solver == "kfac" and solution.iterations == 1
    assert solution.damping == pytest.approx((0.1 * 12 + 0.1 * 3 + 0.5 * 4 + 1.0 * 2) / 21)
    torch.testing.assert_close(solution.vectors, factors.inverse_apply(v, (0.1, 0.1, 0.5, 1.0), [0.0] * 4, "kfac")[0])
    assert KroneckerSolver(factors, 0.3, [0.0] * 4).solve(v).damping == 0.3
    identity = IdentitySolver(4.0).solve(v)
    torch.testing.assert_close(identity.vectors, v / 4.0)
    assert identity.converged and identity.iterations == 0 and identity.solver == "identity" and identity.damping == 4.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            IdentitySolver(bad).solve(v)


class Source:
    """A CurvatureSource over explicit matrices that records what the solvers asked of it."""

    def __init__(self, spectrum_available: bool = True):
        self.hessian = spd(P, -0.5, 3.0, seed=30)
        self.ggn = spd(P, 0.1, 2.0, seed=31)
        self.asked: list[tuple[str, str]] = []
        self.spectrum_available = spectrum_available
        self.fused_steps = 0

    def matrix(self, curvature):
        return self.hessian if curvature == "hessian" else self.ggn

    def source(self, factors=None) -> CurvatureSource:
        def batch_product(curvature):
            self.asked.append(("batch", curvature))
            m = self.matrix(curvature)
            return lambda idx, x, out=None: x @ m.T

        def full_product(curvature):
            self.asked.append(("full", curvature))
            m = self.matrix(curvature)
            return lambda x: x @ m.T

        def spectrum_of(curvature):
            self.asked.append(("spectrum", curvature))
            if not self.spectrum_available:
                raise AssertionError("this configuration needs no spectrum")
            eig = torch.linalg.eigvalsh(self.matrix(curvature))
            return Spectrum(curvature=curvature, largest=float(eig[-1]), smallest=float(eig[0]), mean=float(eig.mean()),
                            trace=float(eig.sum()), trace_stderr=0.0, num_params=P, examples=5, lanczos_steps=P,
                            probes=4)

        def fused_step(curvature):
            self.asked.append(("fused", curvature))
            m = self.matrix(curvature)

            def step(indices, state, vecs, damp, scale):
                self.fused_steps += 1
                new = vecs + (1 - damp) * state - (state @ m.T) / scale
                return new, float(new.norm(dim=1).max())

            return step

        return CurvatureSource(num_train=5, batch_product=batch_product, full_product=full_product,
                               spectrum=spectrum_of, factors=lambda: factors, decay=[0.0] * 4, fused_step=fused_step)


def test_solver_for_resolves_lissa_against_the_spectrum():
    src = Source()
    config = SolverConfig(solver="lissa", curvature="gauss-newton", damping_ratio=0.5,
                          lissa=LissaConfig(depth=400, batch_size=2, seed=4))
    solver = solver_for(config, src.source())
    mean, largest = float(torch.linalg.eigvalsh(src.ggn).mean()), float(torch.linalg.eigvalsh(src.ggn)[-1])
    assert isinstance(solver, LissaSolver) and solver.retries == 3 and solver.num_train == 5
    assert solver.config.damping == pytest.approx(0.5 * mean)
    assert solver.config.scale == pytest.approx(2.0 * (largest + 0.5 * mean))
    assert solver.config.depth == 400 and solver.config.seed == 4
    assert ("batch", "gauss-newton") in src.asked and ("spectrum", "gauss-newton") in src.asked
    v = vectors(1)
    expected = torch.linalg.solve(src.ggn + 0.5 * mean * torch.eye(P, dtype=torch.float64), v.T).T
    torch.testing.assert_close(solver.solve(v).vectors, expected, rtol=1e-5, atol=1e-8)
    plain = dataclasses.replace(solver, fused_step=None)  # the same knobs through the in-place product
    torch.testing.assert_close(plain.solve(v).vectors, expected, rtol=1e-5, atol=1e-8)
    paper = Source(spectrum_available=False)
    exact = solver_for(SolverConfig.fastif_paper(depth=3), paper.source())
    assert isinstance(exact, LissaSolver) and exact.retries == 0 and exact.config == SolverConfig.fastif_paper(depth=3).lissa
    assert paper.asked == [("batch", "hessian"), ("fused", "hessian")]
    absolute = Source(spectrum_available=True)
    given = solver_for(SolverConfig(solver="lissa", damping=0.8), absolute.source())
    assert given.config.damping == pytest.approx(0.8) and ("spectrum", "gauss-newton") in absolute.asked


@pytest.mark.parametrize("curvature", ["gauss-newton", "hessian"])
def test_lissa_from_solver_for_takes_the_fused_step_of_its_own_curvature(curvature):
    # the fused step is LiSSA's fast path: a solver that silently fell back to the plain product would give the
    # same numbers, only slower, so the steps are counted
    src = Source()
    config = SolverConfig(solver="lissa", curvature=curvature, damping=1.0, lissa=LissaConfig(depth=80))
    solver = solver_for(config, src.source())
    assert ("fused", curvature) in src.asked and ("fused", other(curvature)) not in src.asked
    v = vectors(1)
    solution = solver.solve(v)
    assert src.fused_steps == 80
    expected = torch.linalg.solve(src.matrix(curvature) + torch.eye(P, dtype=torch.float64), v.T).T
    assert float((solution.vectors - expected).norm() / expected.norm()) < 0.02


def other(curvature: str) -> str:
    return "hessian" if curvature == "gauss-newton" else "gauss-newton"


@pytest.mark.parametrize("curvature", ["gauss-newton", "hessian"])
def test_solver_for_cg_and_identity_solve_the_configured_system(curvature):
    src = Source()
    v = vectors(2)
    matrix = src.matrix(curvature)
    config = SolverConfig(solver="cg", curvature=curvature, damping=1.5, cg_tol=1e-11, cg_max_iter=60)
    solver = solver_for(config, src.source())
    assert isinstance(solver, ConjugateGradientSolver)
    assert solver.config == CGConfig(damping=1.5, tol=1e-11, max_iter=60)
    assert src.asked == [("full", curvature)]  # an absolute λ needs no spectrum
    expected = torch.linalg.solve(matrix + 1.5 * torch.eye(P, dtype=torch.float64), v.T).T
    torch.testing.assert_close(solver.solve(v).vectors, expected, rtol=1e-8, atol=1e-10)
    relative = solver_for(SolverConfig(solver="cg", curvature=curvature, damping_ratio=2.0), src.source())
    assert relative.config.damping == pytest.approx(2.0 * float(torch.linalg.eigvalsh(matrix).mean()))
    identity = solver_for(SolverConfig(solver="identity", curvature=curvature, damping_ratio=0.5), src.source())
    assert isinstance(identity, IdentitySolver)
    assert identity.damping == pytest.approx(0.5 * float(torch.linalg.eigvalsh(matrix).mean()))
    quiet = Source(spectrum_available=False)
    assert solver_for(SolverConfig(solver="identity", damping=2.0), quiet.source()).damping == 2.0


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_solver_for_kronecker_per_block_and_absolute(kind):
    factors = hand_made_factors()
    quiet = Source(spectrum_available=False)
    per_block = solver_for(SolverConfig(solver=kind, damping_ratio=3.0), quiet.source(factors))
    assert isinstance(per_block, KroneckerSolver) and per_block.name == kind
    assert per_block.damping == pytest.approx(tuple(3.0 * m for m in factors.block_means(kind)))
    assert quiet.asked == []
    absolute = solver_for(SolverConfig(solver=kind, damping=0.25), quiet.source(factors))
    assert absolute.damping == 0.25 and absolute.name == kind
    src = Source()
    whole = solver_for(SolverConfig(solver=kind, damping_scope="curvature", damping_ratio=0.5), src.source(factors))
    assert whole.damping == pytest.approx(0.5 * float(torch.linalg.eigvalsh(src.ggn).mean()))
    with pytest.raises(ValueError):
        solver_for(SolverConfig(solver=kind, curvature="hessian"), src.source(factors))


# -- the spectrum -----------------------------------------------------------------------------------
def test_lanczos_finds_the_extreme_eigenvalues_of_an_explicit_matrix():
    a = spd(10, -1.0, 7.0, seed=40)
    largest, smallest = lanczos_extremes(lambda x: x @ a.T, 10, 10, seed=3, dtype=torch.float64)
    assert largest == pytest.approx(7.0, rel=1e-8) and smallest == pytest.approx(-1.0, rel=1e-7)


def test_lanczos_ritz_values_are_those_of_the_krylov_space_it_built():
    a = spd(12, 0.0, 9.0, seed=41)
    starts = []

    def product(x):
        starts.append(x[0].clone())
        return x @ a.T

    largest, smallest = lanczos_extremes(product, 12, 4, seed=5, dtype=torch.float64)
    assert len(starts) == 4
    q = starts[0]
    krylov = torch.stack([torch.linalg.matrix_power(a, j) @ q for j in range(4)], dim=1)
    basis, _ = torch.linalg.qr(krylov)
    ritz = torch.linalg.eigvalsh(basis.T @ a @ basis)
    assert largest == pytest.approx(float(ritz[-1]), rel=1e-8) and smallest == pytest.approx(float(ritz[0]), rel=1e-6)
    assert largest < 9.0 and smallest > 0.0  # four steps of twelve: inside the spectrum
    again = []
    lanczos_extremes(lambda x: again.append(x[0].clone()) or x @ a.T, 12, 4, seed=5, dtype=torch.float64)
    assert torch.equal(again[0], q) and float(q.norm()) == pytest.approx(1.0)


def test_lanczos_works_in_its_own_precision_whatever_the_product_returns():
    a = spd(10, -1.0, 7.0, seed=40)
    largest, smallest = lanczos_extremes(lambda x: x.double() @ a.T, 10, 10, seed=3, dtype=torch.float32)
    assert largest == pytest.approx(7.0, rel=1e-4) and smallest == pytest.approx(-1.0, rel=1e-3)
    trace, stderr = hutchinson_trace(lambda z: z.double() @ a.T, 10, 2, dtype=torch.float32)
    assert math.isfinite(trace) and math.isfinite(stderr)  # two probes are enough for a standard error


def test_lanczos_asked_for_more_steps_than_dimensions_in_float32():
    a = spd(8, 0.5, 4.0, seed=44).float()
    largest, smallest = lanczos_extremes(lambda x: x @ a.T, 8, 20, seed=1, dtype=torch.float32)
    assert largest == pytest.approx(4.0, rel=1e-4) and smallest == pytest.approx(0.5, rel=1e-3)


def test_lanczos_stops_when_the_krylov_space_is_exhausted():
    calls = []
    identity = 2.5 * torch.eye(8, dtype=torch.float64)
    largest, smallest = lanczos_extremes(lambda x: calls.append(1) or x @ identity, 8, 20, dtype=torch.float64)
    assert (largest, smallest) == (pytest.approx(2.5), pytest.approx(2.5)) and len(calls) == 1
    two = torch.diag(torch.tensor([1.0] * 4 + [3.0] * 4, dtype=torch.float64))
    calls.clear()
    largest, smallest = lanczos_extremes(lambda x: calls.append(1) or x @ two, 8, 20, dtype=torch.float64)
    assert largest == pytest.approx(3.0) and smallest == pytest.approx(1.0) and len(calls) == 2


def test_hutchinson_is_exact_on_a_diagonal_and_the_mean_of_its_probes_otherwise():
    diagonal = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    trace, stderr = hutchinson_trace(lambda z: z @ diagonal, P, 6, dtype=torch.float64)
    assert trace == pytest.approx(21.0) and stderr == pytest.approx(0.0, abs=1e-12)
    a = spd(P, -1.0, 4.0, seed=42)
    probes = []

    def product(z):
        probes.append(z.clone())
        return z @ a.T

    trace, stderr = hutchinson_trace(product, P, 7, seed=2, dtype=torch.float64, batch=3)
    z = torch.cat(probes)
    assert [len(p) for p in probes] == [3, 3, 1] and set(z.unique().tolist()) == {-1.0, 1.0}
    samples = ((z @ a) * z).sum(1).numpy()
    assert trace == pytest.approx(float(samples.mean()), rel=1e-10)
    assert stderr == pytest.approx(float(samples.std(ddof=1) / math.sqrt(7)), rel=1e-10)
    assert math.isnan(hutchinson_trace(lambda z: z @ a.T, P, 1, dtype=torch.float64)[1])
    other = []
    hutchinson_trace(lambda z: other.append(z.clone()) or z @ a.T, P, 7, seed=3, dtype=torch.float64, batch=3)
    assert not torch.equal(torch.cat(other), z)


def test_estimate_spectrum_puts_it_together():
    a = spd(P, 0.5, 5.0, seed=43)
    result = estimate_spectrum(lambda x: x @ a.T.float(), P, "hessian", examples=9, lanczos_steps=P, probes=8)
    assert result.curvature == "hessian" and result.examples == 9 and result.num_params == P
    assert result.lanczos_steps == P and result.probes == 8
    assert result.largest == pytest.approx(5.0, rel=1e-4) and result.smallest == pytest.approx(0.5, rel=1e-3)
    expected_trace, expected_stderr = hutchinson_trace(lambda x: x @ a.T.float(), P, 8, 0)
    assert result.trace == pytest.approx(expected_trace) and result.trace_stderr == pytest.approx(expected_stderr)
    assert result.mean == pytest.approx(result.trace / P)
    assert Spectrum.from_dict({**result.to_dict(), "extra": 1}) == result
    assert np.isclose(result.to_dict()["largest"], result.largest)
