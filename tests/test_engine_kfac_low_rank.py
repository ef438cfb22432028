"""EK-FAC's rotation through the factors of a low-rank gradient, and its truncated inverse (fastif/curvature/kfac.py
``solved_rows``, ``inverse_factors``).

The tiny models of the other engine tests have blocks too small for factors to pay off, so
here the blocks have MiniLM's shapes (384 and 1536 wide) with random orthogonal eigenbases,
and every result is checked against the dense rotation in float64.
"""

from __future__ import annotations

import pytest
import torch

from fastif.curvature import KroneckerFactors
from fastif.curvature import kfac
from fastif.curvature.kfac import KroneckerBlock, low_rank_budget, low_rank_factors, solved_rows


def orthogonal(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0].float()


def of_rank(rank: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator))


def block(rows: int, cols: int, seed: int = 0) -> KroneckerBlock:
    generator = torch.Generator().manual_seed(seed + 99)
    return KroneckerBlock(q_a=orthogonal(cols, seed), eig_a=torch.rand(cols, generator=generator),
                          q_g=orthogonal(rows, seed + 1), eig_g=torch.rand(rows, generator=generator),
                          corrected=torch.rand(rows, cols, generator=generator) + 0.01)


@pytest.mark.parametrize("rank", [1, 3, 24])
def test_factors_of_a_low_rank_matrix_rebuild_it_with_as_many_columns_as_its_rank(rank):
    matrix = of_rank(rank, 1536, 385, seed=rank)
    left, right = low_rank_factors(matrix, max_rank=24)
    assert left.shape == (1536, rank) and right.shape == (385, rank)
    assert float((left @ right.T - matrix).norm() / matrix.norm()) < 1e-5


def test_a_matrix_past_the_rank_asked_for_has_no_factors_and_zero_has_none_needed():
    assert low_rank_factors(of_rank(5, 384, 385, seed=1), max_rank=4) is None
    assert low_rank_factors(torch.randn(384, 385), max_rank=24) is None
    left, right = low_rank_factors(torch.zeros(384, 385), max_rank=2)
    assert left.shape == (384, 0) and right.shape == (385, 0)


def test_the_budget_tries_factors_only_where_they_save_work():
    assert low_rank_budget(16, 17) == 0  # a tiny model's blocks: always dense
    assert 1 <= low_rank_budget(384, 385) < low_rank_budget(1536, 385) == low_rank_budget(384, 1537) <= 32


def structured_eigenvalues(rows: int, cols: int, seed: int) -> torch.Tensor:
    """EK-FAC-like eigenvalues: large in a few directions, fast-decaying, not one Kronecker product (two of them)."""
    generator = torch.Generator().manual_seed(seed)

    def spectrum(size: int) -> torch.Tensor:
        return torch.logspace(0, -6, size, dtype=torch.float64)[torch.randperm(size, generator=generator)]

    return (torch.outer(spectrum(rows), spectrum(cols)) + 0.5 * torch.outer(spectrum(rows), spectrum(cols))).float()


def explicit(block: KroneckerBlock, matrix: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Q_G [(Q_Gᵀ V Q_A) ⊙ W] Q_Aᵀ in float64."""
    q_g, q_a = block.q_g.double(), block.q_a.double()
    return q_g @ ((q_g.T @ matrix.double() @ q_a) * inverse.double()) @ q_a.T


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3])
def test_the_truncated_inverse_matches_the_damped_inverse_to_the_tolerance_at_the_least_rank(tolerance):
    eigenvalues, shift = structured_eigenvalues(1536, 385, seed=1), 1e-3
    exact = 1.0 / (eigenvalues.double() + shift)
    u, v = kfac.inverse_factors(eigenvalues, shift, tolerance)
    assert float((u.double() @ v.double().T - exact).abs().max()) <= tolerance * float(exact.max()) * 1.001
    rank = u.shape[1]
    left, singular, right = torch.linalg.svd(exact, full_matrices=False)
    fewer = (left[:, : rank - 1] * singular[: rank - 1]) @ right[: rank - 1]
    assert float((fewer - exact).abs().max()) > tolerance * float(exact.max())  # one less is not enough
    assert 2 <= rank <= 64


def test_no_truncated_inverse_where_none_is_asked_for_worth_having_or_finite():
    eigenvalues = structured_eigenvalues(384, 385, seed=2)
    assert kfac.inverse_factors(eigenvalues, 1e-3, 0.0) is None
    noise = torch.rand(384, 385, generator=torch.Generator().manual_seed(3))  # no structure: full rank
    assert kfac.inverse_factors(noise, 1e-3, 1e-6) is None
    assert kfac.inverse_factors(torch.zeros(384, 385), 0.0, 1e-3) is None
    assert kfac.inverse_factors(eigenvalues[:8, :9], 1e-3, 1e-3) is None  # a tiny block: no rank pays


def test_rows_are_solved_exactly_or_through_the_truncated_inverse_where_their_factors_make_that_cheaper(monkeypatch):
    found = []
    monkeypatch.setattr(kfac, "low_rank_factors", lambda m, r: found.append(low_rank_factors(m, r)) or found[-1])
    kron = block(1536, 385)
    kron.corrected = structured_eigenvalues(1536, 385, seed=4)
    inverse = 1.0 / (kron.corrected + 1e-3)
    low = kfac.inverse_factors(kron.corrected, 1e-3, 1e-3)
    truncated = low[0].double() @ low[1].double().T
    rows = torch.stack([of_rank(1, 1536, 385, 1), torch.randn(1536, 385), of_rank(2, 1536, 385, 2), torch.zeros(1536, 385)])

    exact, none = solved_rows(kron, rows, inverse, None)
    assert none == [None] * 4
    for row in range(3):
        assert relative(exact[row], explicit(kron, rows[row], inverse)) < 1e-5
    assert [None if f is None else f[0].shape[1] for f in found] == [1, None, 2, 0]

    solved, factors = solved_rows(kron, rows, inverse, low)
    assert factors[1] is None  # dense: no factors
    assert relative(solved[1], explicit(kron, rows[1], inverse)) < 1e-5
    for row in (0, 2):
        assert relative(solved[row], explicit(kron, rows[row], truncated)) < 1e-5
        left, right = factors[row]
        assert left.shape[1] == right.shape[1] == (row // 2 + 1) * low[0].shape[1]
        torch.testing.assert_close(left @ right.T, solved[row])
    assert float(solved[3].abs().max()) == 0.0


def test_given_factors_are_used_once_checked_and_wrong_ones_are_not(monkeypatch):
    calls = []
    monkeypatch.setattr(kfac, "low_rank_factors", lambda m, r: calls.append(1) or low_rank_factors(m, r))
    kron = block(1536, 385, seed=2)
    kron.corrected = structured_eigenvalues(1536, 385, seed=5)
    kron.bias = 7  # the last input column is a joined bias, whose input is always 1
    inverse = 1.0 / (kron.corrected + 1e-3)
    low = kfac.inverse_factors(kron.corrected, 1e-3, 1e-3)
    g, x = torch.randn(1536, 1), torch.randn(384, 1)
    rows = torch.stack([g @ torch.cat([x, torch.ones(1, 1)]).T, torch.randn(1536, 385)])
    given = [(g, x), (g, x)]  # right for the first row, wrong for the second
    solved, factors = solved_rows(kron, rows, inverse, low, given)
    assert len(calls) == 1  # cross approximation for the second row only
    truncated = low[0].double() @ low[1].double().T
    assert relative(solved[0], explicit(kron, rows[0], truncated)) < 1e-5 and factors[0] is not None
    assert relative(solved[1], explicit(kron, rows[1], inverse)) < 1e-5 and factors[1] is None


def test_a_gradient_of_many_pairs_is_rotated_through_them_with_the_exact_inverse():
    """A folded key's gradient has one pair per head (12): through W's factors its answer would have rank 12·r, more
    work than the dense back rotation; rotating only the gradient's factors is cheaper and exact."""
    kron = block(384, 385, seed=6)
    kron.corrected = structured_eigenvalues(384, 385, seed=7)
    inverse = 1.0 / (kron.corrected + 1e-3)
    low = kfac.inverse_factors(kron.corrected, 1e-3, 1e-3)
    left, right = torch.randn(384, 12), torch.randn(385, 12)
    solved, factors = solved_rows(kron, (left @ right.T).unsqueeze(0), inverse, low, [(left, right)])
    assert factors == [None]
    assert relative(solved[0], explicit(kron, left @ right.T, inverse)) < 1e-5


def test_inverse_apply_of_low_rank_gradients_is_the_damped_inverse_in_float64():
    shapes = [(384, 1536), (384,), (384,)]  # a weight with its joined bias, and a diagonal LayerNorm scale
    kron = block(384, 1537, seed=3)
    kron.bias = 1
    diagonal = torch.rand(384) + 0.1
    factors = KroneckerFactors(names=["w", "b", "ln"], shapes=shapes, kronecker={0: kron}, diagonal={2: diagonal},
                               examples=10)
    gradient = of_rank(1, 384, 1537, seed=4)  # [W | b] of one token: δ [x; 1]ᵀ
    vectors = torch.cat([gradient[:, :-1].reshape(1, -1), gradient[:, -1].reshape(1, -1), torch.randn(1, 384)], dim=1)
    damping, decay = (0.5, 0.5, 0.2), (0.01, 0.0, 0.0)
    solved, _ = factors.inverse_apply(vectors, damping, decay)
    q_g, q_a = kron.q_g.double(), kron.q_a.double()
    inner = (q_g.T @ gradient.double() @ q_a) / (kron.corrected.double() + 0.5 + 0.01)
    expected = q_g @ inner @ q_a.T
    got = torch.cat([solved[0, : 384 * 1536].reshape(384, 1536), solved[0, 384 * 1536 : 384 * 1537].reshape(384, 1)], dim=1)
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
    assert torch.allclose(solved[0, 384 * 1537 :], vectors[0, 384 * 1537 :] / (diagonal + 0.2))


def test_a_process_keeps_the_latest_truncated_inverses_only(monkeypatch):
    """Each request may name its own damping: the truncated inverses kept are bounded, the answers unchanged."""
    monkeypatch.setattr(kfac, "_KEPT_INVERSES", 2)
    kron = block(384, 385, seed=8)
    kron.corrected = structured_eigenvalues(384, 385, seed=9)
    factors = KroneckerFactors(names=["w"], shapes=[(384, 385)], kronecker={0: kron}, diagonal={}, examples=10)
    vectors = of_rank(1, 384, 385, seed=10).reshape(1, -1)
    first, _ = factors.inverse_apply(vectors, 1e-3, (0.0,), tolerance=1e-3)
    for damping in (2e-3, 3e-3, 4e-3):
        factors.inverse_apply(vectors, damping, (0.0,), tolerance=1e-3)
    assert len(factors._inverses) == 2
    torch.testing.assert_close(factors.inverse_apply(vectors, 1e-3, (0.0,), tolerance=1e-3)[0], first)


def test_many_rows_are_solved_in_groups_each_as_if_alone():
    """A job's rows go through a block a group at a time (bounded temporaries); every row's answer is its own."""
    kron = block(384, 1537, seed=5)
    kron.bias = 1
    factors = KroneckerFactors(names=["w", "b"], shapes=[(384, 1536), (384,)], kronecker={0: kron}, diagonal={},
                               examples=10)
    gradients = [of_rank(1 + i % 3, 384, 1537, seed=10 + i) if i % 4 else torch.randn(384, 1537) for i in range(20)]
    vectors = torch.stack([torch.cat([g[:, :-1].reshape(-1), g[:, -1]]) for g in gradients])
    assert len(kfac._row_groups(len(vectors), 384 * 1537 * 4)) > 1  # several groups, with rows of both kinds
    solved, _ = factors.inverse_apply(vectors, 0.5, (0.01, 0.0))
    q_g, q_a = kron.q_g.double(), kron.q_a.double()
    for row, gradient in enumerate(gradients):
        expected = q_g @ ((q_g.T @ gradient.double() @ q_a) / (kron.corrected.double() + 0.51)) @ q_a.T
        got = torch.cat([solved[row, : 384 * 1536].reshape(384, 1536), solved[row, 384 * 1536 :].reshape(384, 1)], dim=1)
        assert float((got.double() - expected).norm() / expected.norm()) < 1e-5, row
        torch.testing.assert_close(factors.inverse_apply(vectors[row : row + 1], 0.5, (0.01, 0.0))[0][0], solved[row])
