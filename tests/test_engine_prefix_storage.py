"""How the frozen prefix's activations are kept: float32, float16 or bfloat16 on disk, or computed again.

And the build writes them (with features and gradient keys) into memory maps batch by
batch, so what it allocates does not grow with the training set.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fastif import CancelledError, DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec, Query, SolverConfig
from fastif.prefix import PrefixStore, prefix_file
from tiny import make_tiny_family, sentences, write_jsonl

QUERIES = [Query("the film was superb and warm"), Query("boring and sad story", label="positive")]
SOLVER = SolverConfig(solver="cg", damping=0.1, cg_max_iter=30)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("prefix-model") / "model", "bert", seed=3, initializer_range=0.3)


def engine_of(model_dir, train, artefacts, **index) -> InfluenceEngine:
    engine = InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(), IndexConfig(**index),
                                        artefact_dir=artefacts, device="cpu")
    engine.prepare()
    return engine


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefix-data") / "train.jsonl", sentences(40, seed=5, noise=0.1))


@pytest.fixture(scope="module")
def float32(model_dir, train, tmp_path_factory):
    return engine_of(model_dir, train, tmp_path_factory.mktemp("artefacts"))


def scores_of(engine: InfluenceEngine) -> np.ndarray:
    _, influences = engine.analyze(QUERIES, k=None, solver=SOLVER)
    return np.stack([influence.scores for influence in influences])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_halves_the_bytes_and_ranks_like_float32(model_dir, train, float32, dtype):
    half = engine_of(model_dir, train, float32.artefact_dir.parent, prefix_dtype=dtype)
    size = (half.artefact_dir / prefix_file(dtype)).stat().st_size
    assert size < 0.52 * (float32.artefact_dir / "prefix.npy").stat().st_size
    assert half.prefix_store.dtype == dtype and half.prefix_store.flat.itemsize == 2
    # The stored values are float32's rounded to the half type, read back as float32.
    exact = float32.prefix_store.gather(range(3), 12, "cpu")
    np.testing.assert_array_equal(half.prefix_store.gather(range(3), 12, "cpu").numpy(),
                                  exact.to(getattr(torch, dtype)).float().numpy())
    expected, actual = scores_of(float32), scores_of(half)
    for row in range(len(QUERIES)):
        assert spearmanr(expected[row], actual[row]).statistic >= 0.999
    np.testing.assert_allclose(actual, expected, rtol=0.05, atol=0.02 * float(np.abs(expected).max()))


def test_recompute_keeps_no_activations_and_gives_the_cached_scores(model_dir, train, float32, tmp_path):
    recomputed = engine_of(model_dir, train, tmp_path, prefix="recompute")
    assert recomputed.prefix_store is None
    assert not any(path.name.startswith("prefix") and path.name != "prefix_offsets.npy"
                   for path in recomputed.artefact_dir.iterdir())
    # The fast paths still start from the prefix's activations, computed for just the batch asked for.
    batch, hidden = recomputed.training_batch([0, 1])
    assert recomputed.factored is not None and hidden is not None and hidden.shape[:2] == batch.input_ids.shape
    np.testing.assert_allclose(scores_of(recomputed), scores_of(float32), rtol=1e-5,
                               atol=1e-5 * float(np.abs(scores_of(float32)).max()))


def test_rounded_activations_have_their_own_artefacts_and_caches(model_dir, train, float32):
    """Their curvature and s_test differ (slightly) from float32's: another fingerprint, so nothing is shared."""
    half = engine_of(model_dir, train, float32.artefact_dir.parent, prefix_dtype="float16")
    assert half.fingerprint != float32.fingerprint and half.artefact_dir != float32.artefact_dir
    recomputed = InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(),
                                            IndexConfig(prefix="recompute"), device="cpu")
    assert recomputed.fingerprint == float32.fingerprint  # float32 numbers either way: the same caches serve
    again = engine_of(model_dir, train, float32.artefact_dir.parent)  # float32 again: loaded, not rebuilt
    np.testing.assert_array_equal(np.asarray(again.prefix_store.flat), np.asarray(float32.prefix_store.flat))
    assert not list(float32.artefact_dir.glob(".building-*"))


def test_what_a_build_allocates_does_not_grow_with_the_training_set(tmp_path):
    """Features, keys and activations go to memory maps: the build's own allocations are those of a few
    batches, plus bookkeeping of a few dozen bytes per example (token lengths, offsets)."""
    model_dir = make_tiny_family(tmp_path / "model", "bert", seed=3, hidden=64, intermediate=64)
    peaks, whole = {}, {}
    for count in (200, 1600):
        train = write_jsonl(tmp_path / f"train-{count}.jsonl", sentences(count, seed=7))
        engine = InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(),
                                            artefact_dir=tmp_path / f"artefacts-{count}", device="cpu")
        tracemalloc.start()
        engine.prepare(batch_size=32)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(engine.prefix_store.flat, np.memmap)
        # What a build that gathers the whole set in memory holds at once.
        whole[count] = engine.prefix_store.flat.nbytes + engine.features.nbytes + engine.gradient_keys.nbytes
    growth, whole_growth = peaks[1600] - peaks[200], whole[1600] - whole[200]
    assert growth < 0.1 * whole_growth, (peaks, whole)


def test_token_ids_are_kept_flat_in_chunks_and_equal_the_tokenizers(model_dir, monkeypatch):
    """No Python list per example (at 400K examples their ints alone take gigabytes); the same ids."""
    from fastif import encoding
    from fastif.modeling import load_classifier

    tokenizer = load_classifier(model_dir, "cpu").tokenizer
    rows = sentences(10, seed=9)
    texts, pairs = [r["text"] for r in rows], [r["text"][::-1] for r in rows]
    monkeypatch.setattr(encoding, "TOKENIZE_CHUNK", 3)  # 10 texts in 4 tokenizer calls
    tokens = encoding.tokenize(tokenizer, texts, pairs, [0] * 10, max_length=12)
    expected = tokenizer(texts, pairs, truncation=True, max_length=12)
    assert tokens.input_ids.flat.dtype == np.uint8 and len(tokens) == 10  # a tiny vocabulary: one byte per id
    assert [tokens.input_ids[i].tolist() for i in range(10)] == expected["input_ids"]
    assert [tokens.token_type_ids[i].tolist() for i in range(10)] == expected["token_type_ids"]
    assert tokens.lengths == [len(ids) for ids in expected["input_ids"]]
    padded = tokenizer(texts, pairs, truncation=True, max_length=12, padding=True, return_tensors="pt")
    batch = encoding.collate(tokens, list(range(10)), tokenizer.pad_token_id, torch.device("cpu"))
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(getattr(batch, name), padded[name]), name
    single = encoding.tokenize(tokenizer, texts, None, [0] * 10, max_length=12)
    assert single.token_type_ids is None  # all 0: not kept, and the model reads none as all 0


def test_ids_are_stored_in_the_narrowest_type_that_holds_them():
    from fastif.encoding import _narrowest

    for values, dtype in [([0, 255], np.uint8), ([0, 256], np.uint16), ([3, 30521], np.uint16), ([70_000], np.int32),
                          ([-1, 5], np.int32)]:
        narrowed = _narrowest(np.asarray(values, dtype=np.int32))
        assert narrowed.dtype == dtype and narrowed.tolist() == values


def test_scores_move_no_more_than_the_activations_do(float32, monkeypatch):
    """A relative change of 1e-6 to every training activation moves the default solver's scores by a like amount
    of their spread. (With attention's key bias among the influence parameters, its gradient, rounding noise
    that the damping divided, moved them by percents: as much as storing the activations in float16 did.)"""
    exact = np.stack([i.scores for i in float32.analyze(QUERIES, k=None)[1]])
    generator = torch.Generator().manual_seed(0)
    gather = PrefixStore.gather_batch

    def nudged(store, indices, batch):
        hidden = gather(store, indices, batch)
        return hidden * (1 + 1e-6 * torch.randn(hidden.shape, generator=generator))

    monkeypatch.setattr(PrefixStore, "gather_batch", nudged)
    moved = np.stack([i.scores for i in float32.analyze(QUERIES, k=None)[1]])
    for row in range(len(QUERIES)):
        assert np.abs(moved[row] - exact[row]).max() <= 1e-4 * exact[row].std()
