"""Influence on the classifier head against an explicit Hessian and a direct linear solve.

With the head alone as influence parameters (34 of them on a tiny BERT), the Hessian of
the mean training loss can be formed exactly, so every score can be checked against
``I(z, z_t) = -∇L(z)ᵀ (H + λI)⁻¹ ∇L(z_t)`` computed naively on an independent float64
copy of the model (plain ``from_pretrained``, eager attention, one example at a time),
with no engine code in the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fastif import CGConfig, DataSpec, InfluenceEngine, InfluenceSpec, LissaConfig, Query
from tiny import LABELS, Reference, assert_close, make_tiny_family, sentences, write_jsonl

NUM_TRAIN = 40
DAMPING = 0.05  # λ
TEST = [{"text": "the acting was superb but the plot dull", "label": "positive"},
        {"text": "really boring film", "label": "negative"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    model = make_tiny_family(root / "model", "bert", seed=3, initializer_range=0.3)
    rows = sentences(NUM_TRAIN, seed=5, noise=0.15)
    train = write_jsonl(root / "train.jsonl", rows)
    return model, train, rows


@pytest.fixture(scope="module", params=[0.0, 0.1], ids=["no-decay", "weight-decay"])
def case(request, setup):
    """The engine and the exact reference, without and with the explicit L2 term."""
    model, train, rows = setup
    weight_decay = request.param
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(params=("classifier",), weight_decay=weight_decay),
                                        device="cpu")
    engine.prepare()
    assert engine.names == ["classifier.weight", "classifier.bias"]
    ref = Reference(model, engine.names, weight_decay=weight_decay)
    hessian = ref.hessian(rows)  # of the mean training loss, L2 term included
    train_grads = ref.gradients(rows)  # [N, P]
    test_grads = ref.gradients(TEST)
    system = hessian + DAMPING * torch.eye(ref.num_params, dtype=hessian.dtype)
    s_tests = torch.linalg.solve(system, test_grads.T).T  # [q, P]
    expected = -(train_grads @ s_tests.T).T.numpy()  # [q, N]
    return engine, ref, hessian, test_grads, s_tests, expected


def _queries() -> list[Query]:
    return [Query(text=t["text"], label=t["label"]) for t in TEST]


def test_reference_is_not_degenerate(case):
    """Guards the test itself: distinct features, a Hessian of full rank, and spread-out scores."""
    engine, ref, hessian, _, _, expected = case
    assert len({round(float(x), 6) for x in engine.features[:, 0]}) > NUM_TRAIN // 2
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues.min() > -1e-10  # the head's CE Hessian is PSD
    assert eigenvalues.max() > 10 * DAMPING  # λ does not drown the curvature
    for row in expected:
        assert (row < 0).any() and (row > 0).any()
        assert np.abs(row).max() > 1e-3


def test_test_gradients_match_naive(case):
    engine, _, _, test_grads, _, _ = case
    encoded = engine.encode(_queries())
    assert [LABELS[i] for i in encoded.labels_used] == [t["label"] for t in TEST]
    assert_close(engine.test_gradients(encoded), test_grads, rtol=1e-5)


def test_full_hessian_matches_exact(case):
    """engine.full_hvp applied to the identity gives the exact Hessian, column by column."""
    engine, ref, hessian, _, _, _ = case
    columns = engine.full_hvp(torch.eye(ref.num_params), batch_size=7)
    assert_close(columns, hessian, rtol=1e-4)


def test_cg_solve_and_scores_match_direct_solve(case):
    engine, _, _, test_grads, s_tests, expected = case
    solution = engine.solve(test_grads.float(), CGConfig(damping=DAMPING, tol=1e-7))
    assert solution.converged
    assert_close(solution.vectors, s_tests, rtol=1e-4)
    for row, s_test in enumerate(solution.vectors):
        assert_close(engine.score(s_test, range(NUM_TRAIN), batch_size=9), expected[row], rtol=1e-4)


def test_analyze_with_cg_matches_direct_solve_on_every_example(case):
    engine, _, _, _, _, expected = case
    _, influences = engine.analyze(_queries(), k=0, solver=CGConfig(damping=DAMPING, tol=1e-7))
    assert len(influences) == len(TEST)
    for influence, row in zip(influences, expected):
        assert influence.converged and influence.distances is None
        assert influence.indices.tolist() == list(range(NUM_TRAIN))
        assert_close(influence.scores, row, rtol=1e-4)
        # helpful = most negative first, harmful = most positive first
        helpful, harmful = influence.ranked(5)
        assert influence.indices[helpful[0]] == int(np.argmin(row)) and influence.indices[harmful[0]] == int(np.argmax(row))


def test_lissa_ranks_like_the_direct_solve(case):
    engine, _, hessian, test_grads, s_tests, expected = case
    scale = 2.0 * float(torch.linalg.eigvalsh(hessian).max())  # above H's largest eigenvalue
    config = LissaConfig(damp=DAMPING / scale, scale=scale, depth=400, batch_size=32, seed=1)
    assert config.damping == pytest.approx(DAMPING)
    solution = engine.solve(test_grads.float(), config)
    for row, s_test in enumerate(solution.vectors):
        error = (s_test.double() - s_tests[row]).norm() / s_tests[row].norm()
        assert error < 0.25, f"LiSSA's s_test is {error:.2f} (relative) from the direct solve"
        scores = engine.score(s_test, range(NUM_TRAIN))
        assert spearmanr(scores, expected[row]).statistic >= 0.95
