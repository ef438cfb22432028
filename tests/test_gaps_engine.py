"""The engine's scoring, its fast paths scored on their own, and the signs of every application's chosen points.

Each fast path that can fall back (per-example factors, the first-token last block, the
top fed straight from the cached prefix) is compared with the naive float64 computation
directly, not only through the engine: a factored score that dropped one parameter's term
(the LayerNorm bias, say) fails here on that parameter's numbers even when the engine
would have noticed and fallen back to its JVPs.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, LissaConfig, Query, SolverConfig
from fastif.applications.correction.selection import Chosen, RoundInfluence, Scored, choose, round_influence
from fastif.applications.examples import training_set
from fastif.applications.graph import influence_graph
from fastif.config import CGConfig
from fastif.query import Influence, feature_distances, solver_config
from fastif.factored import Factor, FactoredScores
from fastif.batches import TrainingBatches
from fastif.scoring import Scorer
from workers.results import explain_items
from fastif.tape import Tape, bias_contraction, recording
from tiny import Reference, assert_close, make_tiny_family, sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_TRAIN = 20
EKFAC = SolverConfig(solver="ekfac")
CG = SolverConfig(solver="cg", damping=0.5, cg_tol=1e-8)
TEXTS = ["the film was really good", "awful boring plot", "quite a lovely story"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gaps-engine")
    model = make_tiny_family(root / "model", "bert", seed=5, initializer_range=0.3, layers=2)
    rows = sentences(NUM_TRAIN, seed=6, noise=0.2)
    train = write_jsonl(root / "train.jsonl", rows)
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(weight_decay=0.01), device="cpu")
    engine.prepare()
    assert engine.factored is not None and engine.objective.top is not None and engine.first_token.enabled
    reference = Reference(model, engine.names, weight_decay=0.01)
    return engine, reference, rows


def direction(engine, seed: int) -> torch.Tensor:
    return torch.randn(engine.num_params, generator=torch.Generator().manual_seed(seed))


# -- scoring ---------------------------------------------------------------------------------------------
def test_score_rows_over_many_chunks_equal_the_naive_loop(setup):
    engine, reference, rows = setup
    grads = reference.gradients(rows)
    s = torch.stack([direction(engine, 1), direction(engine, 2), direction(engine, 3)])
    lists = [[5, 3, 3, 19, 0, 7, 11], [2], [19, 18, 17, 16, 15, 14, 13, 12, 1]]
    scores = engine.score_rows(s, lists, batch_size=3)
    for row, listed in enumerate(lists):
        naive = -(grads[listed] @ s[row].double())
        assert_close(scores[row], naive, rtol=1e-4)
        assert_close(engine.scores_by_jvp(s[row], listed, batch_size=4), naive, rtol=1e-4)
    assert_close(engine.score(s[0], lists[0], batch_size=2), scores[0], rtol=1e-5)


def test_the_factored_path_really_scores_when_it_is_on(setup, monkeypatch):
    """With per-example factors the engine must not quietly take its JVP path (same numbers, many times slower)."""
    engine, reference, rows = setup

    def no_jvp(*args, **kwargs):
        raise AssertionError("scored by JVPs although the factored path is on")

    monkeypatch.setattr(Scorer, "scores_by_jvp", no_jvp)
    s = direction(engine, 9)
    scores = engine.score_rows(s.unsqueeze(0), [[3, 1, 4]])
    assert_close(scores[0], -(reference.gradients([rows[i] for i in (3, 1, 4)]) @ s.double()), rtol=1e-4)
    assert engine.score_rows(torch.zeros(0, engine.num_params), []) == []


def test_a_scorer_uses_the_factors_only_with_the_prefix_they_start_from(setup, monkeypatch):
    """Built over batches with the cached prefix, a Scorer scores by its factors; over batches without, by JVPs."""
    engine, reference, rows = setup
    s = direction(engine, 12)
    naive = -(reference.gradients([rows[i] for i in (2, 8, 5)]) @ s.double())
    cached = TrainingBatches(engine.tokens, engine.pad_id, engine.classifier.device, engine._stages.batches.prefix)
    plain = TrainingBatches(engine.tokens, engine.pad_id, engine.classifier.device, None)
    assert cached.with_prefix and not plain.with_prefix
    fast, slow = Scorer(engine.objective, cached, engine.factored), Scorer(engine.objective, plain, engine.factored)
    assert fast.factored is engine.factored and slow.factored is None
    by_jvp = []
    jvp = Scorer.scores_by_jvp
    monkeypatch.setattr(Scorer, "scores_by_jvp", lambda self, *a, **k: by_jvp.append(self) or jvp(self, *a, **k))
    assert_close(fast.score_rows(s.unsqueeze(0), [[2, 8, 5]])[0], naive, rtol=1e-4)
    assert by_jvp == []
    assert_close(slow.score_rows(s.unsqueeze(0), [[2, 8, 5]])[0], naive, rtol=1e-4)
    assert by_jvp == [slow]
    # no rows: no batch is run
    batched = []
    call = TrainingBatches.__call__
    monkeypatch.setattr(TrainingBatches, "__call__", lambda self, indices: batched.append(indices) or call(self, indices))
    assert fast.score_rows(torch.zeros(0, engine.num_params), []) == [] and batched == []
    fast.score_rows(s.unsqueeze(0), [[4]])
    assert [list(indices) for indices in batched] == [[4]]


def test_a_pool_outside_the_training_set_is_scored_on_its_own_examples(setup):
    engine, reference, _ = setup
    from fastif.applications.examples import encode_examples, influence_scores
    from fastif.data import Example

    pool_rows = sentences(7, seed=77, noise=0.0)
    pool = encode_examples(engine, [Example(r["text"], None, engine.classifier.label2id[r["label"]]) for r in pool_rows])
    s = direction(engine, 4)
    scores = influence_scores(engine, pool, s, [6, 0, 3, 3])
    naive = -(reference.gradients([pool_rows[i] for i in (6, 0, 3, 3)]) @ s.double())
    assert_close(scores, naive, rtol=1e-4)
    assert not np.allclose(scores, engine.score(s, [6, 0, 3, 3]))  # not the training examples of those indices


def test_scoring_reports_progress_and_stops_when_asked(setup):
    engine, _, _ = setup
    seen = []
    engine.score_rows(direction(engine, 1).unsqueeze(0), [list(range(10))], batch_size=4,
                      on_progress=lambda stage, done, total: seen.append((stage, done, total)) and False)
    assert seen[-1] == ("scoring", 10, 10) and all(stage == "scoring" for stage, _, _ in seen)
    seen.clear()
    engine.scores_by_jvp(direction(engine, 1), list(range(10)), batch_size=4,
                         on_progress=lambda stage, done, total: seen.append((stage, done, total)) and False)
    assert [done for _, done, _ in seen] == [4, 8, 10] and {total for _, _, total in seen} == {10}
    from fastif.errors import CancelledError

    with pytest.raises(CancelledError):
        engine.score_rows(direction(engine, 1).unsqueeze(0), [list(range(10))], batch_size=4,
                          on_progress=lambda *a: True)
    with pytest.raises(CancelledError):
        engine.scores_by_jvp(direction(engine, 1), list(range(10)), batch_size=4, on_progress=lambda *a: True)


class Top(nn.Module):
    """A small top with a Linear used on every token, a LayerNorm used twice and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.dense = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.norm.weight.data.uniform_(0.5, 1.5)
        self.norm.bias.data.uniform_(-0.5, 0.5)
        self.head = nn.Linear(5, 3)

    def forward(self, hidden, attention_mask=None, tape=None):
        h = self.norm(torch.tanh(self.dense(hidden)))
        pooled = self.norm(h[:, 0] + h.mean(1))
        return self.head(pooled)


@pytest.mark.parametrize("name", ["dense.weight", "dense.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"])
def test_factored_scores_of_each_parameter_equal_its_naive_per_example_gradient(name):
    top = Top().double()
    params = dict(top.named_parameters())
    hidden = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    factored = FactoredScores(top, list(params.values()), [top.dense, top.norm, top.head])
    uses = factored.factors(SimpleNamespace(attention_mask=None, labels=labels), hidden)
    assert factored.covers(uses)
    position = list(params).index(name)
    s = [torch.zeros_like(p) for p in params.values()]
    s[position] = torch.randn(params[name].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows = torch.tensor([4, 0, 2])
    fast = factored.contract(uses, s, rows)
    naive = []
    for i in rows.tolist():
        loss = F.cross_entropy(top(hidden[i : i + 1]), labels[i : i + 1])
        grad = torch.autograd.grad(loss, params[name])[0]
        naive.append(float((grad * s[position]).sum()))
    torch.testing.assert_close(fast, torch.tensor(naive, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert abs(naive[0]) > 1e-6  # the term is not trivially zero


def test_factors_record_every_use_and_the_bias_joins_its_weight():
    top = Top().double()
    tape = Tape()
    handles = recording(tape, [top.dense, nn.ReLU(), top.norm, nn.Embedding(2, 2), top.head])  # others are skipped
    top(torch.randn(2, 3, 4, dtype=torch.float64))
    for handle in handles:
        handle.remove()
    names = {id(p): n for n, p in top.named_parameters()}
    used = [names[id(u.param)] for u in tape.uses]
    assert used == ["dense.weight", "dense.bias", "norm.weight", "norm.bias", "norm.weight", "norm.bias",
                    "head.weight", "head.bias"]
    joins = {names[id(u.param)]: (names[id(u.joins)] if u.joins is not None else None) for u in tape.uses}
    assert joins == {"dense.weight": None, "dense.bias": "dense.weight", "norm.weight": None, "norm.bias": None,
                     "head.weight": None, "head.bias": "head.weight"}
    pairs = [u.pairs is not None for u in tape.uses]
    assert pairs == [True, False, False, False, False, False, True, False]
    grad = torch.randn(2, 3, 5, dtype=torch.float64)
    left, right = tape.uses[0].pairs(grad, torch.tensor([1]))
    assert left.shape == (1, 3, 5) and right.shape == (1, 3, 4) and torch.equal(left[0], grad[1])
    s = torch.randn(2, 5, dtype=torch.float64)  # two directions at once
    torch.testing.assert_close(bias_contraction(s, grad, torch.tensor([1, 0])), grad[[1, 0]].sum(1) @ s.T)
    assert not FactoredScores(top, [top.dense.weight, nn.Parameter(torch.zeros(2))], [top.dense]).covers(
        [Factor(0, grad, bias_contraction)])


def test_first_token_block_and_top_give_the_full_models_logits(setup):
    engine, reference, rows = setup
    batch, hidden = engine.training_batch(list(range(6)))
    with torch.no_grad():
        fast = engine.objective.top(hidden, batch.attention_mask).double()
    naive = torch.stack([reference.logits(r["text"]) for r in rows[:6]])
    assert_close(fast, naive, rtol=1e-4)


# -- the engine's query --------------------------------------------------------------------------------------
def test_ranked_takes_each_sign_in_order():
    influence = Influence(indices=np.arange(7), scores=np.array([0.3, -0.2, 0.0, -0.5, 0.3, 0.1, -0.2]),
                          distances=None, converged=True, s_test_norm=1.0)
    helpful, harmful = influence.ranked(5)
    assert helpful == [3, 1, 6] and harmful == [4, 0, 5]  # ties: stable order, reversed for the harmful side
    assert influence.ranked(2) == ([3, 1], [4, 0])
    assert influence.ranked(0) == ([], [])
    ties = np.round(np.random.default_rng(1).uniform(-1, 1, size=300), 1)  # many ties: a stable sort keeps their order
    many = Influence(indices=np.arange(300), scores=ties, distances=None, converged=True, s_test_norm=1.0)
    helpful, harmful = many.ranked(80)
    assert helpful == sorted((i for i in range(300) if ties[i] < 0), key=lambda i: (ties[i], i))[:80]
    assert harmful == sorted((i for i in range(300) if ties[i] > 0), key=lambda i: (-ties[i], -i))[:80]


def test_feature_distances_are_l2():
    features = np.array([[0, 0], [3, 4], [1, 1]], dtype=np.float32)
    distances = feature_distances(features, np.array([1, 2]), np.array([0.0, 0.0]))
    np.testing.assert_allclose(distances, [5.0, np.sqrt(2)], rtol=1e-6)
    assert distances.dtype == np.float32


def test_solver_config_of_a_bare_config_is_that_solver_on_the_hessian():
    lissa = LissaConfig(damp=0.02, scale=50.0, depth=7, seed=4)
    config = solver_config(lissa)
    assert (config.solver, config.curvature, config.lissa_absolute, config.lissa) == ("lissa", "hessian", True, lissa)
    assert config.damping == pytest.approx(1.0)
    cg = solver_config(CGConfig(damping=0.3, tol=1e-4, max_iter=9))
    assert (cg.solver, cg.curvature, cg.damping, cg.cg_tol, cg.cg_max_iter) == ("cg", "hessian", 0.3, 1e-4, 9)
    assert solver_config(EKFAC) is EKFAC


def test_candidates_and_influences_of_a_plan(setup):
    engine, reference, rows = setup
    planning = time.perf_counter()
    plan = engine.plan([Query(t) for t in TEXTS])
    assert 0 <= plan.seconds["gradients"] <= time.perf_counter() - planning
    everything = engine.candidates(plan.search[0], None)
    assert everything.indices.tolist() == list(range(NUM_TRAIN)) and everything.distances is None
    assert engine.candidates(plan.search[0], 0).distances is None
    assert engine.candidates(plan.search[0], NUM_TRAIN).distances is None
    some = engine.candidates(plan.search[1], 5)
    assert len(some.indices) == 5
    np.testing.assert_allclose(some.distances, feature_distances(engine.features, some.indices, plan.search[1].feature))
    solving = time.perf_counter()
    s_tests, diagnostics, cached, _ = engine.cached_s_test(plan, CG)
    assert 0 <= plan.seconds["s_test"] <= time.perf_counter() - solving
    assert cached == [False] * 3 and diagnostics["solver"] == "cg" and diagnostics["curvature"] == "gauss-newton"
    assert "damping_scope" not in diagnostics and diagnostics["damping"] == 0.5
    relative = engine.cached_s_test(plan, EKFAC)[1]
    assert relative["damping_scope"] == "block" and relative["damping_ratio"] == 10.0
    assert relative["inverse_rank_tolerance"] == 1e-3 and "inverse_rank_tolerance" not in diagnostics  # ekfac's only
    seen, began = [], time.perf_counter()
    influences = engine.influences(plan, s_tests, 6, diagnostics, [True, False, True],
                                   on_progress=lambda stage, done, total: seen.append((stage, done, total)) and False)
    assert seen and seen[-1] == ("scoring", 18, 18)
    elapsed = time.perf_counter() - began
    assert all(0 <= influence.seconds[stage] <= elapsed for influence in influences for stage in ("knn", "scoring"))
    grads = reference.gradients(rows)
    for row, influence in enumerate(influences):
        assert len(influence.indices) == 6 and [influence.cached for influence in influences] == [True, False, True]
        assert_close(influence.scores, -(grads[influence.indices] @ s_tests[row].double()), rtol=1e-4)
        assert influence.s_test_norm == pytest.approx(float(s_tests[row].norm()))
        assert set(influence.seconds) == {"gradients", "s_test", "knn", "scoring"} and influence.solver["solver"] == "cg"
    assert engine.influences(plan, s_tests, 6, False, [False] * 3)[0].converged is False
    assert engine.influences(plan, s_tests, 6, True, [False] * 3)[0].converged is True
    assert engine.influences(plan, s_tests, 6, {"solver": "cg"}, [False] * 3)[0].converged is True  # not said: True


def test_group_plan_is_one_mean_row(setup):
    engine, reference, _ = setup
    queries = [Query(t) for t in TEXTS[:2]]
    single = engine.plan(queries)
    group = engine.plan(queries, group=True)
    assert len(group.vectors) == 1 and len(group.keys) == 1 and len(group.search) == 1
    torch.testing.assert_close(group.vectors[0], single.vectors.mean(0))
    np.testing.assert_allclose(group.search[0].key, single.encoded.search_keys.mean(0), rtol=1e-5)
    np.testing.assert_allclose(group.search[0].feature, single.encoded.features.mean(0), rtol=1e-5)
    assert group.keys[0] == {"group": single.keys}
    assert single.keys[1] == {"text": TEXTS[1], "text_pair": None, "label": single.encoded.labels_used[1]}


def test_a_partly_cached_plan_solves_only_the_missing_rows(setup):
    engine, _, _ = setup

    memory = Memory()
    first = engine.plan([Query(TEXTS[0])], cache=memory)
    engine.cached_s_test(first, CG, memory)
    plan = engine.plan([Query(t) for t in TEXTS], cache=memory)
    memory.puts.clear()
    s_tests, _, cached, _ = engine.cached_s_test(plan, CG, memory, extra_key=None)
    assert cached == [True, False, False] and memory.puts == ["s_test", "s_test"]
    uncached, _, _, _ = engine.cached_s_test(engine.plan([Query(t) for t in TEXTS]), CG)
    torch.testing.assert_close(s_tests, uncached, rtol=1e-5, atol=1e-8)
    _, everything_cached, all_hit, _ = engine.cached_s_test(plan, CG, memory)
    assert all_hit == [True] * 3
    assert everything_cached == {"solver": "cg", "curvature": "gauss-newton", "converged": True}  # no solver ran
    _, _, other, _ = engine.cached_s_test(plan, CG, memory, extra_key={"parallel": 2})
    assert other == [False, False, False]


# -- the signs of the applications' chosen points ---------------------------------------------------------------
def test_explain_helpful_are_negative_and_harmful_positive(setup):
    engine, _, _ = setup
    encoded, influences = engine.analyze([Query(t) for t in TEXTS], k=None, solver=CG)
    items = [item.model_dump() for item in explain_items(engine, encoded, influences, top=4)]
    for item, influence in zip(items, influences):
        helpful = [e["score"] for e in item["helpful"]]
        harmful = [e["score"] for e in item["harmful"]]
        assert helpful and harmful and all(s < 0 for s in helpful) and all(s > 0 for s in harmful)
        assert helpful == sorted(helpful) and harmful == sorted(harmful, reverse=True)
        by_score = np.sort(influence.scores)
        assert helpful == pytest.approx([s for s in by_score[:4] if s < 0])
        assert harmful == pytest.approx([s for s in by_score[::-1][:4] if s > 0])
        assert item["agreement"]["helpful"] == len(helpful)


def test_graph_edges_carry_the_sign_of_their_score(setup):
    engine, _, _ = setup
    graph = influence_graph(engine, [Query(t) for t in TEXTS], k=None, top=3, solver=CG)
    assert graph["edges"]
    for edge in graph["edges"]:
        assert edge["sign"] == ("helpful" if edge["score"] < 0 else "harmful") and edge["score"] != 0
        assert edge["weight"] == pytest.approx(abs(edge["score"]))
    per_input = {}
    for edge in graph["edges"]:
        per_input.setdefault((edge["target"], edge["sign"]), []).append(edge["score"])
    for (target, sign), scores in per_input.items():
        assert len(scores) <= 3
        assert scores == sorted(scores, reverse=(sign == "harmful"))
    for node in (n for n in graph["nodes"] if n["kind"] == "train"):
        touching = [e["score"] for e in graph["edges"] if e["source"] == node["id"]]
        assert node["degree"] == len(touching) and node["total_score"] == pytest.approx(sum(touching))
    strong = influence_graph(engine, [Query(t) for t in TEXTS], k=None, top=3, threshold=1e9, solver=CG)
    assert strong["edges"] == []


def fake_round(helpful_scores, harmful_scores) -> RoundInfluence:
    return RoundInfluence(
        helpful=Scored(np.arange(100, 100 + len(helpful_scores)), np.asarray(helpful_scores, dtype=np.float64)),
        harmful=Scored(np.arange(200, 200 + len(harmful_scores)), np.asarray(harmful_scores, dtype=np.float64)),
        s_test_norm=1.0, diagnostics={})


def test_correction_chooses_the_strongest_of_the_strategys_sign():
    influence = fake_round([-0.1, 0.4, -0.3, 0.0, -0.3, -0.05], [0.2, -0.9, 0.5, 0.0, 0.2])
    helpful = choose("helpful", influence, 3, 50, np.random.default_rng(0))
    assert helpful == Chosen([102, 104, 100], [-0.3, -0.3, -0.1], 4)
    harmful = choose("harmful", influence, 2, 50, np.random.default_rng(0))
    assert harmful == Chosen([202, 200], [0.5, 0.2], 3)
    few = choose("harmful", influence, 10, 50, np.random.default_rng(0))
    assert few.indices == [202, 200, 204] and few.available == 3
    none = choose("helpful", fake_round([0.1, 0.0], []), 3, 50, np.random.default_rng(0))
    assert none == Chosen([], [], 0)


def test_ties_keep_the_candidates_order():
    """Equal scores are taken in the order the kNN search returned them (a stable sort), on both sides."""
    scores = np.round(np.random.default_rng(0).uniform(-1, 1, size=200), 1)
    influence = fake_round(scores, scores)
    for strategy, sign in (("helpful", -1.0), ("harmful", 1.0)):
        chosen = choose(strategy, influence, 60, 400, np.random.default_rng(0))
        positions = [i - (100 if strategy == "helpful" else 200) for i in chosen.indices]
        expected = sorted((i for i in range(200) if scores[i] * sign > 0), key=lambda i: (-sign * scores[i], i))[:60]
        assert positions == expected and chosen.available == int((scores * sign > 0).sum())


def test_random_points_are_distinct_draws_of_the_seeded_generator():
    picked = choose("random", None, 4, 10, np.random.default_rng(7))
    assert picked.scores is None and picked.available == 10
    assert picked.indices == np.random.default_rng(7).choice(10, size=4, replace=False).tolist()
    assert len(set(picked.indices)) == 4
    small = choose("random", None, 8, 3, np.random.default_rng(1))
    assert sorted(small.indices) == [0, 1, 2] and small.available == 3


class Memory:
    """An in-process TensorCache (the protocol's two methods) that records its traffic."""

    def __init__(self):
        self.store, self.puts, self.gets = {}, [], []

    def get(self, kind, payload):
        self.gets.append(kind)
        return self.store.get((kind, repr(sorted(payload.items()))))

    def put(self, kind, payload, tensor):
        self.puts.append(kind)
        self.store[(kind, repr(sorted(payload.items())))] = tensor


def test_round_influence_scores_each_side_of_the_anchors(setup):
    engine, reference, rows = setup
    candidates = training_set(engine)
    anchors = [Query(TEXTS[0]), Query(TEXTS[2])]
    plan = engine.plan(anchors, group=True)
    keys = engine.gradient_keys.astype(np.float64) @ plan.search[0].key.astype(np.float64)
    strongest = [set(np.argsort(-np.abs(keys))[:k]) for k in range(NUM_TRAIN)]
    # For each side a k at which it differs from the strongest of either sign (else a mix-up of sides could pass).
    k_helpful = next(k for k in range(2, NUM_TRAIN) if strongest[k] != set(np.argsort(-keys)[:k]))
    k_harmful = next(k for k in range(2, NUM_TRAIN) if strongest[k] != set(np.argsort(keys)[:k]))
    s_test = engine.solve(plan.vectors, CG).vectors[0]
    for k in sorted({k_helpful, k_harmful, 6}):
        memory, seen = Memory(), []
        result = round_influence(engine, candidates, anchors, CG, k, memory,
                                 on_progress=lambda stage, done, total: seen.append(stage) and False)
        assert memory.puts == ["grad", "grad", "s_test"] and "s_test" in memory.gets
        assert "scoring" in seen and "s_test" in seen
        assert result.diagnostics["solver"] == "cg" and result.diagnostics["damping"] == 0.5
        assert result.helpful.scores.dtype == np.float64
        assert result.helpful.indices.tolist() == np.argsort(-keys, kind="stable")[:k].tolist()
        assert result.harmful.indices.tolist() == np.argsort(keys, kind="stable")[:k].tolist()
    grads = reference.gradients(rows)
    for side in (result.helpful, result.harmful):
        assert_close(side.scores, -(grads[side.indices] @ s_test.double()), rtol=1e-4)
    assert result.s_test_norm == pytest.approx(float(s_test.norm()), rel=1e-5)
    chosen = choose("helpful", result, 3, NUM_TRAIN, np.random.default_rng(0))
    assert chosen.scores and all(s < 0 for s in chosen.scores)
    harmful = choose("harmful", result, 3, NUM_TRAIN, np.random.default_rng(0))
    assert harmful.scores and all(s > 0 for s in harmful.scores)
