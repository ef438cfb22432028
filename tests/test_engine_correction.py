"""Error correction in the engine (fastif/applications/correction): FastIF's iterative protocol.

The "twist" task (tests/app_tasks.py): reviews containing "twist" are negative, the
model never saw one and gets them wrong, and the training set holds 8 that fix it.
Each check is against an independent computation or a known answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app_tasks import MARKER, reviews, twist_task
from fastif import DataSpec, Example, InfluenceEngine, InfluenceSpec, Query
from fastif.applications import CorrectionConfig, correct
from fastif.applications.correction.stepping import ParameterUpdate, WeightsKeyedCache, stepped_names
from fastif.applications.examples import training_set
from fastif.config import SolverConfig

EKFAC = SolverConfig()
LISSA = SolverConfig(solver="lissa", curvature="hessian", damping=0.01)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("twist")
    twist = twist_task(root)
    engine = InfluenceEngine.from_paths(root / twist["model"], DataSpec(path=str(root / twist["train"])),
                                        InfluenceSpec(weight_decay=0.01))
    engine.prepare()
    label = engine.classifier.label2id
    anchors = [Query(r["text"], None, r["label"]) for r in twist["anchors"]]
    evaluation = [Example(r["text"], None, label[r["label"]]) for r in twist["evaluation"]]
    return engine, twist, anchors, evaluation


def _state(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def _run(task, **settings):
    engine, _, anchors, evaluation = task
    config = CorrectionConfig(**{"num_points": 4, "lr": 0.2, "rounds": 3, "anchors_per_round": 2, "trials": 2,
                                 "k": 40, **settings})
    return correct(engine, anchors, evaluation, config=config, solver=EKFAC)


def test_helpful_points_are_negative_and_harmful_positive_every_round(task):
    outcome = _run(task)
    strategies = outcome.report["strategies"]
    for trial in strategies["helpful"]["trials"]:
        for round_ in trial["rounds"]:
            assert round_["points"] and all(p["score"] < 0 for p in round_["points"])
    for trial in strategies["harmful"]["trials"]:
        for round_ in trial["rounds"]:
            assert round_["points"] and all(p["score"] > 0 for p in round_["points"])
    # The fixes are the last 8 training examples: the helpful side finds them, the harmful side never does.
    fixes = set(task[1]["fix_train_indices"])
    assert len({p["index"] for p in strategies["helpful"]["trials"][0]["rounds"][0]["points"]} & fixes) >= 3
    assert not {i for t in strategies["harmful"]["trials"] for i in t["points"]} & fixes


def test_both_signs_get_their_own_candidates(task):
    """With k small, asking the index for the largest |⟨·,·⟩| leaves one side empty; each side searched alone does not."""
    engine, _, anchors, _ = task
    plan = engine.plan(anchors, group=True)
    train = training_set(engine)
    both, _ = train.nearest(plan.search[0], 8)
    aligned, _ = train.nearest(plan.search[0], 8, side="aligned")
    opposed, _ = train.nearest(plan.search[0], 8, side="opposed")
    keys = engine.gradient_keys.astype(np.float64) @ plan.search[0].key.astype(np.float64)
    # Independent: the 8 largest and 8 smallest inner products by a full sort.
    assert set(aligned) == set(np.argsort(-keys)[:8]) and set(opposed) == set(np.argsort(keys)[:8])
    assert len(aligned) == len(opposed) == 8 and not set(aligned) & set(opposed)
    assert set(both) <= set(aligned) | set(opposed)


def test_each_round_recomputes_influence_on_the_updated_model(task):
    engine, _, anchors, evaluation = task
    cache = _DictCache()
    config = CorrectionConfig(num_points=4, lr=0.2, rounds=3, anchors_per_round=len(anchors), trials=1, k=40,
                              strategies=("helpful",))
    outcome = correct(engine, anchors, evaluation, config=config, solver=EKFAC, cache=cache)
    rounds = outcome.report["strategies"]["helpful"]["trials"][0]["rounds"]
    norms = [r["s_test_norm"] for r in rounds]
    assert len(set(norms)) == 3, norms  # the same anchors every round: only the model changed
    # Round 0 read and wrote the registered model's entries, later rounds entries keyed by their weights.
    weights = {payload.get("weights") for kind, payload in cache.keys if kind == "s_test"}
    assert None in weights and len(weights - {None}) == 2
    # The updated models' anchor gradients are recomputed, never stored (parameter-sized, per anchor and round).
    assert not [p for k, p in cache.keys if k == "grad" and "weights" in p]
    # An independent s_test on the registered model equals round 0's.
    plan = engine.plan(anchors, group=True)
    s_test = engine.cached_s_test(plan, EKFAC)[0][0]
    assert float(s_test.norm()) == pytest.approx(norms[0], rel=1e-5)


def test_trials_draw_different_anchors_and_random_points(task):
    outcome = _run(task, rounds=2, trials=3)
    helpful, random_ = outcome.report["strategies"]["helpful"], outcome.report["strategies"]["random"]
    draws = [tuple(tuple(r["anchors"]) for r in t["rounds"]) for t in helpful["trials"]]
    assert len(set(draws)) == 3
    assert [tuple(t["points"]) for t in random_["trials"]] != [tuple(random_["trials"][0]["points"])] * 3
    # Every strategy of a trial draws the same anchors (a paired comparison).
    assert [[r["anchors"] for r in t["rounds"]] for t in random_["trials"]] == [list(map(list, d)) for d in draws]
    values = helpful["delta_accuracy"]["values"]
    assert len(values) == 3 and helpful["delta_accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert helpful["delta_accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))


def test_per_label_report_adds_up_and_matches_a_recount(task):
    engine, twist, anchors, evaluation = task
    # A control set of ordinary reviews (both labels), which the model gets right: what the correction costs there.
    label = engine.classifier.label2id
    control = [Example(r["text"], None, label[r["label"]]) for r in reviews(30, seed=21)]
    config = CorrectionConfig(num_points=4, lr=0.2, rounds=2, anchors_per_round=2, trials=1, k=40)
    report = correct(engine, anchors, evaluation, config=config, solver=EKFAC, control=control).report
    assert report["control"]["size"] == 30 and report["control"]["before"]["accuracy"] >= 0.8
    for strategy in report["strategies"].values():
        final_control = strategy["trials"][0]["final"]["control"]
        assert sum(map(sum, final_control["confusion"])) == 30 and set(final_control["per_label"]) == {"negative", "positive"}
        assert strategy["control"]["accuracy"]["mean"] == pytest.approx(final_control["accuracy"])
        assert strategy["by_round"][-1]["control_accuracy"]["mean"] == pytest.approx(final_control["accuracy"])
    gold = np.array([ex.label for ex in evaluation])
    for strategy in report["strategies"].values():
        final = strategy["trials"][0]["final"]
        confusion = np.array(final["confusion"])
        assert confusion.sum() == report["evaluation"]["size"] == len(evaluation)
        assert sum(v["count"] for v in final["per_label"].values()) == len(evaluation)
        assert np.trace(confusion) / confusion.sum() == pytest.approx(final["accuracy"])
        assert final["fixed"] - final["broken"] == round(final["delta_accuracy"] * len(evaluation))
        assert len(final["fixed_examples"]) == min(final["fixed"], 20)
        last = strategy["trials"][0]["rounds"][-1]
        assert len(last["fixed_ids"]) == last["fixed"] == final["fixed"] and len(last["broken_ids"]) == final["broken"]
        assert [e["index"] for e in final["fixed_examples"]] == last["fixed_ids"][:20]
        for item in final["fixed_examples"]:
            assert item["label"] == "negative" == engine.classifier.labels[gold[item["index"]]] and item["after"] == "negative"
    # Helpful points fix the twist reviews (all negative); random points do far less.
    assert report["strategies"]["helpful"]["delta_accuracy"]["mean"] >= 0.3
    assert report["strategies"]["helpful"]["delta_accuracy"]["mean"] > report["strategies"]["random"]["delta_accuracy"]["mean"] + 0.2
    assert all(MARKER in p["text"] for p in report["strategies"]["helpful"]["first_trial_points"][:3])


def test_the_model_is_untouched_afterwards(task):
    engine = task[0]
    before = _state(engine)
    _run(task, rounds=2, trials=1, params="trainable", optimizer="adam", lr=0.01)
    after = _state(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert [n for n, p in engine.model.named_parameters() if p.requires_grad] == engine.objective.names


def test_a_step_is_sgd_on_the_loss_with_its_l2_term(task):
    """One SGD step equals θ − lr·∇(mean cross-entropy + ½·wd·Σθ²) computed on a copy of the model with plain autograd."""
    engine, _, _, _ = task
    train = training_set(engine)
    update = ParameterUpdate(engine, "trainable", "sgd", 0.1, l2=True)
    assert set(update.names) == {n for n, _ in engine.model.named_parameters() if ".layer.0." not in n
                                 and "embeddings" not in n}
    # A fresh copy from disk: the engine's model has its fast forward paths installed.
    copy_model = type(engine.model).from_pretrained(engine.classifier.path).eval()
    named = dict(copy_model.named_parameters())
    for p in copy_model.parameters():
        p.requires_grad_(True)
    rows = [0, 5, 9]
    texts = [engine.train[i].text for i in rows]
    encoded = engine.classifier.tokenizer(texts, padding=True, return_tensors="pt")
    logits = copy_model(**encoded).logits
    loss = F.cross_entropy(logits, torch.tensor([engine.train[i].label for i in rows]))
    decayed = [n for n in update.names if not any(t in n for t in engine.spec.weight_decay_ignores)]
    loss = loss + 0.5 * 0.01 * sum((named[n] ** 2).sum() for n in decayed)
    grads = dict(zip(update.names, torch.autograd.grad(loss, [named[n] for n in update.names])))
    try:
        update.step(train, rows)
        live = dict(engine.model.named_parameters())
        for name in update.names:
            expected = named[name].detach() - 0.1 * grads[name]
            torch.testing.assert_close(live[name].detach(), expected, rtol=1e-4, atol=1e-6)
        assert update.digest() != update.original_digest
    finally:
        update.reset()
    assert update.digest() == update.original_digest


def test_bad_settings_are_refused(task):
    engine, _, anchors, evaluation = task
    with pytest.raises(ValueError, match="anchors_per_round"):
        correct(engine, anchors, evaluation, config=CorrectionConfig(anchors_per_round=len(anchors) + 1))
    with pytest.raises(ValueError, match="empty"):
        correct(engine, anchors, [], config=CorrectionConfig())
    with pytest.raises(ValueError, match="at least 1"):
        CorrectionConfig(rounds=0)
    with pytest.raises(ValueError, match="below block"):
        stepped_names(engine, ["bert.embeddings"])
    with pytest.raises(ValueError, match="optimizer"):
        CorrectionConfig(optimizer="rmsprop")


class _DictCache:
    """A tensor cache in a dict that remembers every key it was asked for."""

    def __init__(self):
        self.store, self.keys = {}, []

    def _key(self, kind, payload):
        return kind, repr(sorted(payload.items(), key=lambda kv: kv[0]))

    def get(self, kind, payload):
        self.keys.append((kind, dict(payload)))
        return self.store.get(self._key(kind, payload))

    def put(self, kind, payload, tensor):
        self.store[self._key(kind, payload)] = tensor.clone()


def test_weights_keyed_cache_never_returns_another_models_entry():
    inner = _DictCache()
    WeightsKeyedCache(inner, "a").put("grad", {"x": 1}, torch.ones(2))
    assert not inner.store and WeightsKeyedCache(inner, "a").get("grad", {"x": 1}) is None
    WeightsKeyedCache(inner, "a").put("s_test", {"x": 1}, torch.ones(2))
    assert WeightsKeyedCache(inner, "b").get("s_test", {"x": 1}) is None
    assert inner.get("s_test", {"x": 1}) is None
    assert torch.equal(WeightsKeyedCache(inner, "a").get("s_test", {"x": 1}), torch.ones(2))
