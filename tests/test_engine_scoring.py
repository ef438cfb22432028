"""The fast paths (frozen-prefix cache, first-token last block, scoring by per-example factors
or by batched JVPs, padded batches) against the naive per-example loop on an independent float64 copy of the model.

Every case asserts first that the fast path it claims to test is really switched on (or
off), so a silent fallback cannot make the comparison trivially true.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastif import DataSpec, InfluenceEngine, InfluenceSpec, Query
from fastif.factored import FactoredScores
from tiny import Reference, assert_close, make_tiny_family, sentences, write_jsonl

NUM_TRAIN = 24
PAIRS = ["the story was fun", "it was dull and cold", "quite a lovely film"]

# name -> (family, model config, influence params, text pairs?, prefix cached?, first-token last block?,
#          cached activations straight into the last block and head (fastif/top.py)?)
CASES = {
    # auto on BERT: last block + pooler + head; prefix cached, last block first-token only
    "bert-auto": ("bert", {"layers": 3}, "auto", False, True, True, True),
    # two blocks: the prefix is only block 0, the last block still runs first-token only
    "bert-two-layers": ("bert", {"layers": 3}, ("bert.encoder.layer.1", "bert.encoder.layer.2", "bert.pooler", "classifier"),
                        False, True, True, False),
    # embeddings among the params: nothing can be cached, the whole model runs every time
    "bert-no-prefix": ("bert", {"layers": 2}, ("bert.embeddings.word_embeddings", "bert.encoder.layer.1", "classifier"),
                       False, False, True, False),
    # sentence pairs: token_type_ids through the cache and the first-token block
    "bert-pairs": ("bert", {"layers": 2}, "auto", True, True, True, True),
    # DistilBERT's blocks are not BERT-shaped: the first-token optimisation is off
    "distilbert-auto": ("distilbert", {"layers": 3}, "auto", False, True, False, False),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, config, params, pairs, prefixed, first_token, top = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make_tiny_family(root / "model", family, seed=11, initializer_range=0.3, **config)
    rows = sentences(NUM_TRAIN, seed=2, noise=0.2)
    if pairs:
        for i, row in enumerate(rows):
            row["premise"] = PAIRS[i % len(PAIRS)]
    train = write_jsonl(root / "train.jsonl", rows)
    data = DataSpec(str(train), text_field="premise" if pairs else "text", text_pair_field="text" if pairs else None)
    engine = InfluenceEngine.from_paths(model, data, InfluenceSpec(params=params), device="cpu")
    engine.prepare()
    assert (engine.prefix is not None) == prefixed
    assert (engine.prefix_store is not None) == prefixed
    assert engine.first_token.enabled == first_token
    assert (engine.objective.top is not None) == top
    assert (engine.factored is not None) == top  # scores from per-example factors (fastif/factored.py)
    ref_rows = [{"text": r["premise"], "text_pair": r["text"], "label": r["label"]} if pairs else r for r in rows]
    ref = Reference(model, engine.names)
    return engine, ref, ref_rows


def _direction(engine: InfluenceEngine, seed: int) -> torch.Tensor:
    return torch.randn(engine.num_params, generator=torch.Generator().manual_seed(seed))


def test_scores_equal_naive_per_example_gradients(case):
    engine, ref, rows = case
    naive_grads = ref.gradients(rows)
    assert naive_grads.norm(dim=1).min() > 0
    assert len({round(float(g), 8) for g in naive_grads[:, -1]}) > NUM_TRAIN // 2  # examples differ
    for seed in (0, 1):
        s_test = _direction(engine, seed)
        expected = -(naive_grads @ s_test.double()).numpy()
        # all candidates, in a shuffled order and with batches mixing lengths
        order = np.random.default_rng(seed).permutation(NUM_TRAIN)
        assert_close(engine.score(s_test, order, batch_size=5), expected[order], rtol=1e-5)
        # a subset, one at a time (no padding at all)
        subset = [3, 17, 8]
        assert_close(engine.score(s_test, subset, batch_size=1), expected[subset], rtol=1e-5)


def test_several_rows_on_shared_candidates_equal_naive(case):
    """Each s_test scored on its own list: lists that overlap, repeat an index, or hold one example."""
    engine, ref, rows = case
    naive_grads = ref.gradients(rows)
    s_tests = torch.stack([_direction(engine, seed) for seed in (3, 4, 5)])
    lists = [[5, 1, 9, 1, 20], list(range(NUM_TRAIN))[::-1], [9]]
    progress = []
    actual = engine.score_rows(s_tests, lists, batch_size=4, on_progress=lambda *a: progress.append(a) and False)
    # float32 rounding is relative to the size of the scores, not of one list's (the one-element list's
    # only score came out 1.3e-5 off relative to itself with the transformers installed on 2026-12-01)
    floor = 1e-6 * float((naive_grads @ s_tests.double().T).abs().max())
    for s_test, listed, scores in zip(s_tests, lists, actual):
        assert scores.shape == (len(listed),)
        np.testing.assert_allclose(scores, -(naive_grads[listed] @ s_test.double()).numpy(), rtol=1e-5, atol=floor)
    assert progress[-1][0] == "scoring" and progress[-1][1] == progress[-1][2]


@pytest.mark.parametrize("case", [name for name, spec in CASES.items() if spec[-1]], indirect=True)
def test_factors_that_miss_a_parameter_are_not_used(case):
    """Without the hooks on the block's Linear and LayerNorm modules the tape misses parameters."""
    engine, _, _ = case
    partial = FactoredScores(engine.objective.top, engine.objective.params, modules=[])
    batch, hidden = engine.training_batch([0, 1])
    uses = partial.factors(batch, hidden)
    assert uses and not partial.covers(uses)
    assert engine.factored.covers(engine.factored.factors(batch, hidden))


def test_hvp_equals_naive_double_backward(case):
    engine, ref, rows = case
    vectors = torch.stack([_direction(engine, 5), _direction(engine, 6)])
    for indices in ([0, 5, 9, 14, 20], [7], [2, 2, 11]):  # mixed lengths (padded), one example, a repeat
        actual = engine.hvp(indices, vectors)
        assert actual.shape == vectors.shape
        for row in range(len(vectors)):
            expected = ref.hvp([rows[i] for i in indices], vectors[row].double())
            assert expected.norm() > 0
            assert_close(actual[row], expected, rtol=1e-4)


def test_full_hvp_is_the_mean_over_the_training_set(case):
    engine, ref, rows = case
    vector = _direction(engine, 9)
    assert_close(engine.full_hvp(vector.unsqueeze(0), batch_size=7)[0], ref.hvp(rows, vector.double()), rtol=1e-4)


def test_test_gradients_equal_naive(case):
    engine, ref, rows = case
    if rows[0].get("text_pair"):
        queries = [Query(text=r["text"], text_pair=r["text_pair"], label=r["label"]) for r in rows[:4]]
    else:
        queries = [Query(text=r["text"], label=r["label"]) for r in rows[:4]]
    encoded = engine.encode(queries)
    assert_close(engine.test_gradients(encoded), ref.gradients(rows[:4]), rtol=1e-5)


def test_training_gradients_through_the_cache_equal_naive(case):
    """The mean gradient of a padded training batch, run on the cached prefix activations."""
    engine, ref, rows = case
    indices = [1, 4, 13, 22]
    batch, hidden = engine.training_batch(indices)
    assert (hidden is not None) == (engine.prefix is not None)
    expected = ref.gradients([rows[i] for i in indices]).mean(dim=0)
    assert_close(engine.objective.gradient(batch, hidden), expected, rtol=1e-5)


def test_predictions_and_features_equal_the_plain_model(case):
    """encode's probabilities and kNN features come from the patched model: they must equal the plain one's."""
    engine, ref, rows = case
    queries = [Query(text=r["text"], text_pair=r.get("text_pair")) for r in rows[:5]]
    encoded = engine.encode(queries)
    for i, row in enumerate(rows[:5]):
        with torch.no_grad():
            out = ref.model(**ref.encode(row["text"], row.get("text_pair")), output_hidden_states=True)
        assert_close(encoded.probs[i], torch.softmax(out.logits[0], -1), rtol=1e-5)
        assert_close(encoded.features[i], out.hidden_states[-1][0, 0], rtol=1e-5)
        assert_close(engine.features[i], out.hidden_states[-1][0, 0], rtol=1e-5)
