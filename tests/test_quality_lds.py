"""fastif/quality/: the linear datamodeling score, against computations written out here.

- ``lds`` against a plain loop with scipy's spearmanr per input;
- scores that reproduce a linear loss model exactly give LDS 1 (their negation -1),
  independent random scores give about 0;
- one full-batch SGD epoch is one gradient step, computed with torch.autograd on an
  independent float64 copy of the model (full forward, no cached prefix);
- retraining never writes the model's weights, and is deterministic per seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fastif import CGConfig, DataSpec, InfluenceEngine, InfluenceSpec, Query
from fastif.errors import CancelledError
from fastif.quality import (RetrainConfig, columnwise_spearman, eval_losses, eval_set, influence_scores, lds,
                            random_subsets, retrain, retrained_test_losses, subset_sums)
from tiny import Reference, assert_close, make_tiny_bert, sentences, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_TRAIN = 24
WEIGHT_DECAY = 0.01
TESTS = [("the movie was really great", "positive"), ("a dull and boring story", "negative"),
         ("quite fun but cold", "positive"), ("the acting was poor", "negative")]
MORE_TESTS = [("it was nice and warm", "positive"), ("the plot was weak and sad", "negative"), ("a superb film", "positive"),
              ("really awful acting", "negative")]


# -- subsets and the score, no model -------------------------------------------------------------------------
def test_random_subsets_are_fixed_size_and_deterministic_per_seed() -> None:
    a = random_subsets(50, 12, fraction=0.3, seed=4)
    assert a.shape == (12, 50) and a.dtype == bool
    assert (a.sum(axis=1) == 15).all()
    assert np.array_equal(a, random_subsets(50, 12, fraction=0.3, seed=4))
    assert not np.array_equal(a, random_subsets(50, 12, fraction=0.3, seed=5))
    assert len({row.tobytes() for row in a}) == 12  # the subsets differ from each other
    with pytest.raises(ValueError):
        random_subsets(50, 3, fraction=0.0)


def test_lds_equals_a_naive_loop_with_scipy() -> None:
    rng = np.random.default_rng(0)
    q, n, count = 6, 30, 25
    scores = rng.normal(size=(q, n))
    subsets = random_subsets(n, count, seed=1)
    losses = rng.normal(size=(count, 2, q))
    losses[:, :, 2] = np.round(losses[:, :, 2], 1)  # ties
    losses[:, :, 4] = 0.7  # constant: no correlation defined
    result = lds(scores, subsets, losses)

    expected, noise = [], []
    for t in range(q):
        sums = [sum(scores[t, i] for i in range(n) if subsets[j, i]) for j in range(count)]
        mean_loss = [(losses[j, 0, t] + losses[j, 1, t]) / 2 for j in range(count)]
        rho = spearmanr(sums, mean_loss).statistic
        expected.append(0.0 if np.isnan(rho) else rho)
        rho = spearmanr(losses[:, 0, t], losses[:, 1, t]).statistic
        noise.append(0.0 if np.isnan(rho) else rho)
    np.testing.assert_allclose(result.per_input, expected, rtol=1e-10, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert result.standard_error == pytest.approx(np.std(expected, ddof=1) / np.sqrt(q), abs=1e-12)
    assert result.retraining_noise == pytest.approx(np.mean(noise), abs=1e-12)
    assert result.constant == 1 and result.per_input[4] == 0.0
    assert (result.num_subsets, result.num_inputs) == (count, q)
    np.testing.assert_allclose(subset_sums(scores, subsets)[:, 0], [
        sum(scores[0, i] for i in range(n) if subsets[j, i]) for j in range(count)], rtol=1e-12)
    # one seed: no noise estimate; the 2-d form is the same as one seed
    single = lds(scores, subsets, losses[:, 0])
    assert single.retraining_noise is None
    assert single.per_input == lds(scores, subsets, losses[:, :1]).per_input


def test_scores_of_a_linear_loss_model_give_one_and_random_scores_about_zero() -> None:
    rng = np.random.default_rng(3)
    q, n, count = 20, 60, 200
    true = rng.normal(size=(q, n))
    subsets = random_subsets(n, count, seed=2)
    # Removing z_i changes the loss by -I_i / N: the loss is a constant plus Σ_{i∈S} I_i / N.
    loss = 0.4 + subsets.astype(float) @ true.T / n
    losses = np.stack([loss, loss], axis=1)
    perfect = lds(true, subsets, losses)
    assert perfect.mean == pytest.approx(1.0, abs=1e-12) and perfect.retraining_noise == pytest.approx(1.0)
    assert lds(-true, subsets, losses).mean == pytest.approx(-1.0, abs=1e-12)
    # any positive rescaling of the scores gives the same LDS (ranks only)
    assert lds(3.0 * true, subsets, losses).per_input == pytest.approx(perfect.per_input)
    random = lds(rng.normal(size=(q, n)), subsets, losses)
    assert abs(random.mean) < 0.08 and random.standard_error < 0.05
    # a noisy linear model: positive but below 1
    noisy = lds(true + rng.normal(scale=1.0, size=true.shape), subsets, losses)
    assert 0.3 < noisy.mean < 0.95


def test_columnwise_spearman_counts_constant_columns() -> None:
    a = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    b = np.array([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    rho, constant = columnwise_spearman(a, b)
    assert rho.tolist() == pytest.approx([-1.0, 0.0]) and constant == 1


# -- retraining on a tiny model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    model = make_tiny_bert(root / "model", seed=5, layers=2, initializer_range=0.3)
    rows = sentences(NUM_TRAIN, seed=7, noise=0.15)
    train = write_jsonl(root / "train.jsonl", rows)
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(weight_decay=WEIGHT_DECAY),
                                        device="cpu")
    engine.prepare()
    assert engine.prefix_store is not None and engine.objective.top is not None  # the cached fast path is the one tested
    queries = [Query(text, label=label) for text, label in TESTS]
    return engine, Reference(model, engine.names, weight_decay=WEIGHT_DECAY), rows, queries


def _weights(engine: InfluenceEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def _assert_same_steps(params: dict, expected: dict, ref: Reference, rtol: float) -> None:
    """θ - θ₀ of every tensor within ``rtol`` of the hand-made step, with an absolute floor of ``rtol`` times the
    largest step entry (some entries' gradients are zero in exact arithmetic: the key bias under softmax)."""
    start = dict(zip(ref.names, (p.detach() for p in ref.params)))
    ours = {n: params[n].double() - start[n] for n in ref.names}
    theirs = {n: expected[n].double() - start[n] for n in ref.names}
    largest = max(float(t.abs().max()) for t in theirs.values())
    assert largest > 1e-3  # the step is not trivially small
    for name in ref.names:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=rtol, atol=rtol * largest, err_msg=name)


def test_one_full_batch_sgd_epoch_is_one_gradient_step_of_the_objective(tiny) -> None:
    engine, ref, rows, queries = tiny
    subset = [1, 2, 3, 5, 8, 13, 21, 22]
    lr = 0.5
    params = retrain(engine, subset, RetrainConfig(epochs=1, batch_size=None, lr=lr, optimizer="sgd", seeds=1,
                                                   schedule="constant"))

    # By hand: θ₁ = θ₀ - lr ∇θ [mean over the subset of CE + (wd/2)||θ_decay||²], float64, full forward.
    grads = torch.autograd.grad(ref.mean_loss([rows[i] for i in subset]), ref.params)
    expected = {name: (p - lr * g).detach() for name, p, g in zip(ref.names, ref.params, grads)}
    assert set(params) == set(expected)
    _assert_same_steps(params, expected, ref, rtol=2e-5)

    # The test losses at θ₁: cross-entropy of each gold label, no L2 term.
    losses = eval_losses(engine, params, eval_set(engine, queries))
    by_hand = []
    with torch.no_grad():
        for query in queries:
            logits = ref.logits(query.text, params=expected)
            target = torch.tensor([ref.label_id(query.label)])
            by_hand.append(float(torch.nn.functional.cross_entropy(logits.unsqueeze(0), target)))
    assert_close(losses, np.array(by_hand), rtol=2e-5)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_two_full_batch_sgd_epochs_are_two_steps(tiny, schedule: str) -> None:
    engine, ref, rows, _ = tiny
    subset = list(range(0, NUM_TRAIN, 2))
    lr = 0.3
    params = retrain(engine, subset, RetrainConfig(epochs=2, batch_size=None, lr=lr, optimizer="sgd", seeds=1,
                                                   schedule=schedule))
    theta = [p.detach().clone() for p in ref.params]
    # linear: the learning rate decays to 0 over the run, so the two steps take lr and lr / 2
    for rate in ((lr, lr) if schedule == "constant" else (lr, lr / 2)):
        current = {n: t.requires_grad_(True) for n, t in zip(ref.names, theta)}
        loss = sum(ref.loss(rows[i], current) for i in subset) / len(subset)
        grads = torch.autograd.grad(loss, list(current.values()))
        theta = [(t - rate * g).detach() for t, g in zip(theta, grads)]
    _assert_same_steps(params, dict(zip(ref.names, theta)), ref, rtol=5e-5)


def test_retraining_leaves_the_weights_alone_and_is_deterministic_per_seed(tiny) -> None:
    engine, _, _, queries = tiny
    before = _weights(engine)
    subsets = random_subsets(NUM_TRAIN, 4, seed=0)
    config = RetrainConfig(epochs=2, batch_size=4, lr=1e-2, optimizer="adam", seeds=2)
    first = retrained_test_losses(engine, subsets, queries, config)
    assert first.shape == (4, 2, len(queries)) and np.isfinite(first).all()
    again = retrained_test_losses(engine, subsets, eval_set(engine, queries), config)
    assert np.array_equal(first, again)
    assert not np.array_equal(first[:, 0], first[:, 1])  # the two seeds shuffle differently
    other = retrained_test_losses(engine, subsets, queries, RetrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=1))
    assert not np.array_equal(first, other)
    scores = influence_scores(engine, queries, CGConfig(damping=0.1, tol=1e-8))
    assert scores.shape == (len(queries), NUM_TRAIN)
    after = _weights(engine)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    # the losses at θ₀ are the model's own
    base = eval_losses(engine, {n: p.detach() for n, p in zip(engine.objective.names, engine.objective.params)},
                       eval_set(engine, queries))
    encoded = engine.encode(queries)
    labels = [1 if label == "positive" else 0 for _, label in TESTS]
    assert_close(base, -np.log(encoded.probs[np.arange(len(queries)), labels]), rtol=1e-4)


def test_cancelling_stops_the_retraining(tiny) -> None:
    engine, _, _, queries = tiny
    seen = []

    def cancel_after_two(stage: str, done: int, total: int) -> bool:
        seen.append((stage, done, total))
        return done >= 2

    with pytest.raises(CancelledError):
        retrained_test_losses(engine, random_subsets(NUM_TRAIN, 3, seed=0), queries,
                              RetrainConfig(epochs=1, batch_size=8, seeds=2), on_progress=cancel_after_two)
    assert seen == [("retraining", 1, 6), ("retraining", 2, 6)]


def test_exact_influence_predicts_retraining_from_an_optimum(tiny, tmp_path) -> None:
    """End to end: a tiny model trained to its optimum, CG scores at a small damping, subsets retrained near theirs."""
    engine, _, rows, _ = tiny
    from transformers import AutoModelForSequenceClassification

    optimum = retrain(engine, range(NUM_TRAIN), RetrainConfig(epochs=300, batch_size=None, lr=1e-2, seeds=1))
    model = AutoModelForSequenceClassification.from_pretrained(engine.classifier.path)
    model.load_state_dict({**model.state_dict(), **optimum})
    model.save_pretrained(tmp_path / "optimum")
    engine.classifier.tokenizer.save_pretrained(tmp_path / "optimum")
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    trained = InfluenceEngine.from_paths(tmp_path / "optimum", DataSpec(str(train)), InfluenceSpec(weight_decay=WEIGHT_DECAY),
                                         device="cpu")
    trained.prepare()
    assert float(trained.objective.gradient(*trained.training_batch(list(range(NUM_TRAIN)))).norm()) < 0.02
    queries = [Query(text, label=label) for text, label in TESTS + MORE_TESTS]
    subsets = random_subsets(NUM_TRAIN, 20, seed=3)
    losses = retrained_test_losses(trained, subsets, queries,
                                   RetrainConfig(epochs=60, batch_size=None, lr=1e-2, optimizer="adam", seeds=1))
    scores = influence_scores(trained, queries, CGConfig(damping=1e-2, tol=1e-8))
    result = lds(scores, subsets, losses)
    assert result.mean > 0.25, result.per_input
    assert lds(-scores, subsets, losses).mean == pytest.approx(-result.mean)

