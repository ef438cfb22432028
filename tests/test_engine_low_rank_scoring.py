"""EK-FAC's s_test through the test gradients' factors and a truncated inverse, scored through its own factors
(fastif/curvature/kfac.py ``solved_rows``, fastif/low_rank_scoring.py): every score is checked against forward-mode
JVPs of the same s_test, and every factor against the dense tensor it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastif import DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec, Query, SolverConfig
from fastif import encoded as encoded_module  # (its test_* functions are not tests)
from tiny import make_tiny_family, sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERIES = [Query(t) for t in ("the film was superb and warm", "boring and sad story", "a warm story",
                              "the plot was dull", "superb acting", "sad and boring film")]
# The tiny model's blocks are 16 to 32 wide: a loose tolerance gives their inverse a rank of a few.
TRUNCATED = SolverConfig(inverse_rank_tolerance=0.2)


def make_engine(folder, weight_decay: float) -> InfluenceEngine:
    model = make_tiny_family(folder / "model", "bert", seed=4, initializer_range=0.3)
    train = write_jsonl(folder / "train.jsonl", sentences(40, seed=6, noise=0.1))
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(weight_decay=weight_decay),
                                        IndexConfig(), artefact_dir=folder / "artefacts", device="cpu")
    engine.prepare()
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("low-rank"), 0.0)


@pytest.fixture(scope="module")
def decayed(tmp_path_factory):
    """With weight decay the test gradient holds the L2 term wd·θ: no block of it is of low rank."""
    return make_engine(tmp_path_factory.mktemp("low-rank-decayed"), 0.01)


def jvp_scores(engine, s_test: torch.Tensor, indices) -> np.ndarray:
    return engine.scores_by_jvp(s_test, indices)


def test_the_single_pair_blocks_are_the_first_token_layers_not_the_folded_keys_and_values(engine):
    names = {engine.names[p] for p in engine._stages.scorer.single_pairs().positions}
    assert {n for n in names if "intermediate" in n or "output.dense" in n or "query" in n or "pooler" in n
            or "classifier" in n} == names
    assert any("intermediate.dense" in n for n in names) and any("classifier" in n for n in names)
    assert not any("key" in n or "value" in n for n in names)  # one pair per head


def test_the_test_gradients_factors_rebuild_each_matrix_of_the_dense_gradient(engine):
    plan = engine.plan(QUERIES[:3])
    factors = encoded_module.test_gradient_factors(engine.prepared.factored, plan.encoded, engine.pad_id, [0, 1, 2])
    assert any(left.shape[1] == 1 for left, _ in factors[0].values())  # first-token layers: one pair
    assert any(left.shape[1] > 1 for left, _ in factors[0].values())  # folded keys and values: one per head
    for row, found in enumerate(factors):
        views = engine.objective.unflatten(plan.vectors[row])
        for position, (left, right) in found.items():
            torch.testing.assert_close(left @ right.T, views[position], rtol=1e-4, atol=1e-6)


def test_given_factors_change_how_s_test_is_computed_not_what_it_is(engine):
    plan = engine.plan(QUERIES)
    exact = SolverConfig(inverse_rank_tolerance=0.0)
    dense = engine.solve(plan.vectors, exact).vectors
    through = engine.solve(plan.vectors, exact, gradient_factors=engine.gradient_factors(plan, exact, list(range(6))))
    torch.testing.assert_close(through.vectors, dense, rtol=1e-4, atol=1e-6 * float(dense.abs().max()))


def test_rows_of_low_rank_blocks_carry_factors_that_rebuild_them(engine):
    plan = engine.plan(QUERIES)
    s_tests, _, _, factors = engine.cached_s_test(plan, TRUNCATED)
    assert all(factors) and any("intermediate.dense" in engine.names[p] for p in factors[0])
    for row, found in enumerate(factors):
        views = engine.objective.unflatten(s_tests[row])
        for position, block in found.items():
            rebuilt = block.left @ block.right.T
            if block.bias is not None:
                torch.testing.assert_close(rebuilt[:, -1], views[block.bias])
                rebuilt = rebuilt[:, :-1]
            torch.testing.assert_close(rebuilt, views[position])


@pytest.mark.parametrize("shared, grid_rows, some_cached", [(True, 64, False), (True, 4, False), (False, 64, False),
                                                           (True, 64, True)],
                         ids=["rows-share-candidates", "in-groups-of-4-rows", "rows-apart", "some-rows-without-factors"])
def test_scores_through_the_factors_are_the_jvps_of_the_same_s_test(engine, shared, grid_rows, some_cached, monkeypatch):
    """Rows that share their candidates are scored all against all (a few large products, in groups of at most
    GRID_ROWS rows), rows that do not one by one: either way each score is -⟨∇L(z_i), s_test⟩ by forward mode."""
    monkeypatch.setattr("fastif.scoring.GRID_ROWS", grid_rows)
    plan = engine.plan(QUERIES)
    s_tests, _, _, factors = engine.cached_s_test(plan, TRUNCATED)
    if some_cached:  # rows from a cache have no factors: scored densely, beside the others
        factors = [None if row in (1, 3) else f for row, f in enumerate(factors)]
    candidates = [list(range(40))] * 6 if shared else [list(range(row * 6, row * 6 + 6)) for row in range(6)]
    scores = engine.score_rows(s_tests, candidates, factors=factors)
    for row in range(6):
        expected = jvp_scores(engine, s_tests[row], candidates[row])
        np.testing.assert_allclose(scores[row], expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_with_weight_decay_no_row_has_factors_and_scores_stay_the_jvps_of_s_test(decayed):
    plan = decayed.plan(QUERIES)
    s_tests, _, _, factors = decayed.cached_s_test(plan, TRUNCATED)
    assert factors == [{}] * len(QUERIES)
    scores = decayed.score_rows(s_tests, [list(range(40))] * 6, factors=factors)
    for row in range(6):
        expected = jvp_scores(decayed, s_tests[row], list(range(40)))
        np.testing.assert_allclose(scores[row], expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_analyze_scores_as_the_jvps_of_its_s_test_at_the_default_and_a_truncated_inverse(engine, decayed, weight_decay):
    engine = engine if weight_decay == 0.0 else decayed
    for solver in (SolverConfig(), TRUNCATED, SolverConfig(solver="kfac", inverse_rank_tolerance=0.2)):
        _, influences = engine.analyze(QUERIES, k=None, solver=solver)
        plan = engine.plan(QUERIES)
        s_tests = engine.cached_s_test(plan, solver).vectors
        for row, influence in enumerate(influences):
            expected = jvp_scores(engine, s_tests[row], influence.indices)
            np.testing.assert_allclose(influence.scores, expected, rtol=1e-4,
                                       atol=1e-5 * float(np.abs(expected).max()))


def test_the_truncated_inverse_moves_each_block_of_s_test_no_further_than_its_tolerance_allows(engine):
    """Per Kronecker block, s − s_exact = Q_G [(Q_Gᵀ V Q_A) ⊙ E] Q_Aᵀ with |E| ≤ tol · max W entrywise, so
    ‖s − s_exact‖ ≤ tol · max W · ‖V‖ (the bases are orthonormal)."""
    from fastif.curvature import solver_for

    plan = engine.plan(QUERIES)
    given = engine.gradient_factors(plan, TRUNCATED, list(range(len(QUERIES))))
    exact = engine.solve(plan.vectors, SolverConfig(inverse_rank_tolerance=0.0)).vectors
    approx = engine.solve(plan.vectors, TRUNCATED, gradient_factors=given).vectors
    assert not torch.equal(approx, exact)  # the tolerance does truncate
    solver = solver_for(TRUNCATED, engine.curvature)
    factors = engine.factors()

    def block_of(vector: torch.Tensor, position: int) -> torch.Tensor:
        views, bias = engine.objective.unflatten(vector), factors.kronecker[position].bias
        return torch.cat([views[position], views[bias].unsqueeze(-1)], dim=-1) if bias is not None else views[position]

    for position, block in factors.kronecker.items():
        inverse = 1.0 / (block.eigenvalues("ekfac").double() + solver.damping[position] + solver.decay[position])
        for row in range(len(QUERIES)):
            moved = float((block_of(approx[row], position) - block_of(exact[row], position)).norm())
            bound = 0.2 * float(inverse.max()) * float(block_of(plan.vectors[row], position).norm())
            assert moved <= bound * 1.01 + 1e-5 * float(block_of(exact[row], position).norm()), (position, row)
