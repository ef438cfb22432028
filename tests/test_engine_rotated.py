"""EK-FAC's rows left in the eigenbasis, scored against rotated candidates (fastif/rotated.py): the same scores as
s_test itself, for less work where rows share candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastif import DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec, Query, SolverConfig
from fastif.rotated import RotatedBlocks
from tiny import make_tiny_family, sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERIES = [Query(t) for t in ("the film was superb and warm", "boring and sad story", "a warm story",
                              "the plot was dull", "superb acting", "sad and boring film")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rotated")
    model = make_tiny_family(folder / "model", "bert", seed=4, initializer_range=0.3)
    train = write_jsonl(folder / "train.jsonl", sentences(40, seed=6, noise=0.1))
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(weight_decay=0.01), IndexConfig(),
                                        artefact_dir=folder / "artefacts", device="cpu")
    engine.prepare()
    return engine


def test_the_single_pair_blocks_are_the_first_token_layers_not_the_folded_keys_and_values(engine):
    rotated = engine._stages.scorer.rotatable(engine.factors())
    names = {engine.names[p] for p in rotated.positions}
    assert {n for n in names if "intermediate" in n or "output.dense" in n or "query" in n or "pooler" in n
            or "classifier" in n} == names
    assert any("intermediate.dense" in n for n in names) and any("classifier" in n for n in names)
    assert not any("key" in n or "value" in n for n in names)  # one pair per head: rotating them would cost more


@pytest.mark.parametrize("solver", [SolverConfig(), SolverConfig(solver="kfac")])
def test_rotated_rows_score_what_s_test_scores(engine, solver):
    plan = engine.plan(QUERIES)
    candidates = [np.arange(engine.num_train)[row::2] for row in range(len(QUERIES))]
    s_tests = engine.solve(plan.vectors, solver).vectors
    rotated = engine._stages.scorer.rotatable(engine.factors())
    kept = engine.solve(plan.vectors, solver, rotated=rotated).vectors
    expected = engine.score_rows(s_tests, candidates)
    actual = engine.score_rows(kept, candidates, rotated=rotated)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    # The rows are not s_test where they stay rotated (same norm: the bases are orthonormal), and are elsewhere.
    np.testing.assert_allclose(kept.norm(dim=1).numpy(), s_tests.norm(dim=1).numpy(), rtol=1e-4)
    views, rotated_views = engine.objective.unflatten(s_tests[0]), engine.objective.unflatten(kept[0])
    covered = rotated.skipped()
    for position, (view, rotated_view) in enumerate(zip(views, rotated_views)):
        if position in covered:
            assert not torch.allclose(view, rotated_view, rtol=1e-3, atol=1e-6)
        else:
            torch.testing.assert_close(rotated_view, view)


def test_rotating_pays_for_rows_that_share_candidates_and_not_for_one_row(engine):
    rotated = engine._stages.scorer.rotatable(engine.factors())
    blocks = [engine.factors().kronecker[p] for p in rotated.positions]
    per_candidate = sum(b.q_g.shape[0] ** 2 + b.q_a.shape[0] ** 2 for b in blocks)
    per_row = sum(b.q_g.shape[0] * b.q_a.shape[0] * (b.q_g.shape[0] + b.q_a.shape[0]) for b in blocks)
    for rows, candidates in [(1, 40), (6, 40), (32, 1470), (1, 1000)]:
        assert rotated.worth_it(rows, candidates) == (candidates * per_candidate < rows * per_row)
    assert not RotatedBlocks(engine.factors(), ()).worth_it(100, 1)


def test_analyze_without_a_cache_rotates_where_it_pays_and_scores_as_s_test_does(engine, monkeypatch):
    """Six inputs over every example rotate; one input with all 40 does not; either way the scores are s_test's."""
    calls = []
    real = RotatedBlocks.rotate
    monkeypatch.setattr(RotatedBlocks, "rotate", lambda self, uses: calls.append(1) or real(self, uses))
    plan = engine.plan(QUERIES)
    s_tests = engine.solve(plan.vectors).vectors
    expected = engine.score_rows(s_tests, [np.arange(engine.num_train)] * len(QUERIES))
    _, influences = engine.analyze(QUERIES, k=None)
    assert calls
    for want, influence, s in zip(expected, influences, s_tests):
        np.testing.assert_allclose(influence.scores, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
        assert influence.s_test_norm == pytest.approx(float(s.norm()), rel=1e-4)
    calls.clear()
    engine.analyze(QUERIES[:1], k=None)
    assert not calls


def test_rotated_rows_never_go_through_a_cache(engine):
    rotated = engine._stages.scorer.rotatable(engine.factors())
    with pytest.raises(ValueError, match="never cached"):
        engine.cached_s_test(engine.plan(QUERIES[:1]), SolverConfig(), cache=object(), rotated=rotated)
    with pytest.raises(ValueError, match="only EK-FAC and K-FAC"):
        engine.solve(engine.plan(QUERIES[:1]).vectors, SolverConfig(solver="identity"), rotated=rotated)
