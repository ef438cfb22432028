"""kNN candidates: exact neighbours with the Flat index in both spaces (FastIF's L2 over features,
and the default inner product over the output layer's gradients), high recall with IVF / HNSW,
and the mean feature, mean gradient key and mean test gradient of a group query."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from fastif import CGConfig, DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec, Query, knn
from fastif.knn import SearchQuery
from tiny import Reference, assert_close, make_tiny_family, sentences, write_jsonl

NUM_TRAIN = 40
QUERIES = [Query("the film was superb and warm"), Query("boring and sad story", label="positive"),
           Query("it was quite nice but dull")]
# A random tiny model is far from a minimum: its Hessian over the auto parameters has
# eigenvalues down to about -7, so λ must exceed that for CG (H + λI must be positive definite).
CG = CGConfig(damping=10.0, tol=1e-7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    model = make_tiny_family(root / "model", "bert", seed=4, initializer_range=0.3)
    return model, write_jsonl(root / "train.jsonl", sentences(NUM_TRAIN, seed=8, noise=0.1))


@pytest.fixture(scope="module")
def engine(files):
    """FastIF's feature space: L2 between first-token features."""
    engine = InfluenceEngine.from_paths(files[0], DataSpec(str(files[1])), InfluenceSpec(), IndexConfig(space="feature"),
                                        device="cpu")
    engine.prepare()
    return engine


@pytest.fixture(scope="module")
def gradient_engine(files):
    """The default space: inner products of the output layer's loss gradients."""
    engine = InfluenceEngine.from_paths(files[0], DataSpec(str(files[1])), InfluenceSpec(), device="cpu")
    assert engine.index_config.space == "gradient"
    engine.prepare()
    return engine


def feature_query(feature: np.ndarray) -> SearchQuery:
    return SearchQuery(key=feature, feature=feature)


def brute_force(features: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distances = np.sqrt(((features.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1))
    order = np.argsort(distances, kind="stable")[:k]
    return order, distances[order]


def test_features_are_distinct(engine):
    assert engine.features.shape == (NUM_TRAIN, engine.model.config.hidden_size)
    distances = np.sqrt(((engine.features[:, None] - engine.features[None]) ** 2).sum(-1))
    off_diagonal = distances[~np.eye(NUM_TRAIN, dtype=bool)]
    assert np.median(off_diagonal) > 0.1


def test_flat_candidates_are_the_true_nearest_neighbours(engine):
    encoded = engine.encode(QUERIES)
    for query in encoded.features:
        for k in (1, 5, 17):
            expected, distances = brute_force(engine.features, query, k)
            found = engine.candidates(feature_query(query), k)
            assert found.indices.tolist() == expected.tolist()
            np.testing.assert_allclose(found.distances, distances, rtol=1e-4, atol=1e-5)
    # a training example's own feature finds itself at distance 0
    found = engine.candidates(feature_query(engine.features[7]), 3)
    assert found.indices[0] == 7 and found.distances[0] == pytest.approx(0.0, abs=1e-3)


def test_k_zero_or_at_least_n_scores_everything(engine):
    for k in (None, 0, NUM_TRAIN, NUM_TRAIN + 5):
        found = engine.candidates(feature_query(engine.features[0]), k)
        assert found.indices.tolist() == list(range(NUM_TRAIN)) and found.distances is None


def test_analyze_scores_exactly_the_nearest_candidates(engine):
    encoded, influences = engine.analyze(QUERIES, k=6, solver=CG)
    _, all_influences = engine.analyze(QUERIES, k=0, solver=CG)
    assert all(i.converged for i in influences + all_influences)
    for row, influence in enumerate(influences):
        expected, distances = brute_force(engine.features, encoded.features[row], 6)
        assert influence.indices.tolist() == expected.tolist()
        np.testing.assert_allclose(influence.distances, distances, rtol=1e-4, atol=1e-5)
        # the candidates' scores are the same as when every example is scored
        assert_close(influence.scores, all_influences[row].scores[expected], rtol=1e-5)


def test_group_query_uses_the_mean_feature_and_the_mean_test_gradient(engine):
    encoded = engine.encode(QUERIES)
    mean_feature = encoded.features.mean(axis=0)
    _, influences = engine.analyze(QUERIES, k=7, solver=CG, group=True)
    assert len(influences) == 1
    group = influences[0]
    assert group.converged
    expected, distances = brute_force(engine.features, mean_feature, 7)
    assert group.indices.tolist() == expected.tolist()
    np.testing.assert_allclose(group.distances, distances, rtol=1e-4, atol=1e-5)
    # the mean feature is not simply one input's: the group's candidates differ from each input's
    assert any(engine.candidates(feature_query(f), 7).indices.tolist() != expected.tolist() for f in encoded.features)
    # s_test of the mean gradient: by linearity the group's scores are the mean of the inputs' scores
    _, singles = engine.analyze(QUERIES, k=0, solver=CG)
    mean_scores = np.mean([single.scores[expected] for single in singles], axis=0)
    assert_close(group.scores, mean_scores, rtol=1e-4)
    # and directly: solve for the mean of the test gradients
    mean_grad = engine.test_gradients(encoded).mean(dim=0, keepdim=True)
    s_test = engine.solve(mean_grad, CG).vectors[0]
    assert_close(group.scores, engine.score(s_test, expected), rtol=1e-5)


def test_group_test_gradient_is_the_mean_of_naive_gradients(engine, tmp_path_factory):
    """The group's vector is the mean of ∇L(z_t) with each input's label used (given or predicted)."""
    plan = engine.plan(QUERIES, group=True)
    assert plan.vectors.shape == (1, engine.num_params)
    ref = Reference(engine.classifier.path, engine.names)
    labels = [engine.classifier.labels[i] for i in plan.encoded.labels_used]
    assert labels[1] == "positive"  # given
    rows = [{"text": q.text, "label": label} for q, label in zip(QUERIES, labels)]
    assert_close(plan.vectors[0], ref.gradients(rows).mean(dim=0), rtol=1e-5)


def clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middles = rng.normal(size=(centres, dim)) * 4.0
    return (middles[rng.integers(centres, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indices_have_high_recall(kind, tmp_path):
    features = clustered(6000, 32, 64, seed=0)
    queries = clustered(50, 32, 64, seed=1)
    index = knn.build_index(features, IndexConfig(kind=kind, space="feature"))
    assert isinstance(index, faiss.IndexIVFFlat if kind == "ivf" else faiss.IndexHNSWFlat)
    distances = ((queries[:, None].astype(np.float64) - features[None]) ** 2).sum(-1)
    order = np.argsort(distances, axis=1)
    for k in (10, 100):
        found = [knn.search(index, query, k) for query in queries]
        recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, order[:, :k])])
        assert recall >= 0.9, f"{kind} recall@{k} = {recall:.3f}"
        # nearest first
        assert all((np.diff(d[f]) >= -1e-3).all() for d, f in zip(distances, found))
    # saved and loaded (mapped from the file), the index answers the same
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    again = knn.load_index(tmp_path / "index.faiss")
    if kind == "ivf":
        assert again.nprobe == index.nprobe > 1  # a reloaded IVF index must not fall back to nprobe 1
    assert all((knn.search(again, q, 10) == knn.search(index, q, 10)).all() for q in queries)


def test_small_ivf_request_falls_back_to_exact(engine):
    index = knn.build_index(engine.features, IndexConfig(kind="ivf", space="feature"))  # N < 256: exact
    assert isinstance(index, faiss.IndexFlatL2)
    assert isinstance(knn.build_index(engine.gradient_keys, IndexConfig(kind="ivf")), faiss.IndexFlatIP)


def test_engine_with_hnsw_index_finds_the_nearest(tmp_path_factory):
    root = tmp_path_factory.mktemp("hnsw")
    model = make_tiny_family(root / "model", "bert", seed=4, initializer_range=0.3)
    train = write_jsonl(root / "train.jsonl", sentences(NUM_TRAIN, seed=8, noise=0.1))
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(), IndexConfig(kind="hnsw", space="feature"),
                                        device="cpu")
    engine.prepare()
    assert isinstance(engine.index, faiss.IndexHNSWFlat)
    query = engine.encode(QUERIES[:1]).search(0)
    expected, _ = brute_force(engine.features, query.feature, 5)
    assert engine.candidates(query, 5).indices.tolist() == expected.tolist()  # 40 points: HNSW is exact here


# -- the gradient space ---------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_gradient_keys_keep_the_inner_products_of_output_layer_gradients(classes):
    rng = np.random.default_rng(classes)
    probs = rng.dirichlet(np.ones(classes), size=30)
    labels = rng.integers(classes, size=30)
    inputs = rng.normal(size=(30, 7))
    keys = knn.gradient_keys(probs, labels, inputs)
    assert keys.shape == (30, (classes - 1) * 7)
    residual = probs - np.eye(classes)[labels]
    gradients = np.einsum("nc,na->nca", residual, inputs).reshape(30, -1)  # ∇_W ℓ = (p - e_y) aᵀ
    np.testing.assert_allclose(keys.astype(np.float64) @ keys.T, gradients @ gradients.T, rtol=1e-5, atol=1e-6)


def test_training_keys_are_the_naive_output_layer_gradients(gradient_engine, files):
    """An independent copy of the model, differentiated example by example, gives the same inner products."""
    ref = Reference(files[0], ["classifier.weight"])
    rows = sentences(NUM_TRAIN, seed=8, noise=0.1)
    naive = ref.gradients(rows)
    assert naive.norm(dim=1).min() > 0
    keys = torch.as_tensor(gradient_engine.gradient_keys, dtype=torch.float64)
    assert_close(keys @ keys.T, naive @ naive.T, rtol=1e-4)


def strongest(keys: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
    similarity = keys.astype(np.float64) @ key.astype(np.float64)
    return np.argsort(-np.abs(similarity), kind="stable")[:k]


def test_gradient_candidates_are_the_strongest_inner_products_of_either_sign(gradient_engine):
    engine = gradient_engine
    encoded = engine.encode(QUERIES)
    for row in range(len(QUERIES)):
        query = encoded.search(row)
        similarity = engine.gradient_keys.astype(np.float64) @ query.key
        for k in (1, 6, 17):
            found = engine.candidates(query, k)
            expected = strongest(engine.gradient_keys, query.key, k)
            assert sorted(found.indices.tolist()) == sorted(expected.tolist())
            assert len(set(found.indices.tolist())) == k
            # strongest first, and both signs are searched
            strengths = np.abs(similarity[found.indices])
            assert (np.diff(strengths) <= 1e-6 * strengths.max()).all()
            # the distances reported are L2 between first-token features, as in the feature space
            _, distances = brute_force(engine.features[found.indices], query.feature, k)
            np.testing.assert_allclose(np.sort(found.distances), distances, rtol=1e-4, atol=1e-5)
        # the opposite key has the same strongest candidates
        opposite = SearchQuery(key=-query.key, feature=query.feature)
        assert sorted(engine.candidates(opposite, 17).indices) == sorted(engine.candidates(query, 17).indices)


def test_gradient_search_finds_the_most_opposed_keys_too():
    keys = np.array([[1.0, 0.0], [0.5, 0.0], [-3.0, 0.0], [-2.0, 0.1], [0.0, 1.0], [0.2, 0.0]], dtype=np.float32)
    index = knn.build_index(keys, IndexConfig())
    assert knn.search(index, np.array([1.0, 0.0]), 3).tolist() == [2, 3, 0]
    assert knn.search(index, np.array([-1.0, 0.0]), 3).tolist() == [2, 3, 0]
    assert sorted(knn.search(index, np.array([1.0, 0.0]), 6).tolist()) == list(range(6))  # each once


def test_gradient_group_query_is_the_mean_key(gradient_engine):
    engine = gradient_engine
    encoded = engine.encode(QUERIES)
    plan = engine.plan(QUERIES, group=True)
    mean_key = encoded.search_keys.mean(axis=0)
    np.testing.assert_allclose(plan.search[0].key, mean_key, rtol=1e-6)
    _, influences = engine.analyze(QUERIES, k=7, solver=CG, group=True)
    assert sorted(influences[0].indices.tolist()) == sorted(strongest(engine.gradient_keys, mean_key, 7).tolist())


def test_switching_space_reuses_the_stored_artefacts(files, tmp_path):
    first = InfluenceEngine.from_paths(files[0], DataSpec(str(files[1])), InfluenceSpec(), device="cpu",
                                       artefact_dir=tmp_path)
    first.prepare()
    folder = tmp_path / first.fingerprint
    stamp = (folder / "meta.json").stat().st_mtime_ns
    other = InfluenceEngine.from_paths(files[0], DataSpec(str(files[1])), InfluenceSpec(), IndexConfig(space="feature"),
                                       device="cpu", artefact_dir=tmp_path)
    other.prepare()
    assert other.fingerprint == first.fingerprint
    assert (folder / "meta.json").stat().st_mtime_ns == stamp  # loaded, not computed again
    assert isinstance(first.index, faiss.IndexFlatIP) and isinstance(other.index, faiss.IndexFlatL2)
    # the default kind "auto" is exactly Flat at this size (fastif.knn.AUTO_FLAT_MAX_EXAMPLES)
    assert (folder / "index-gradient-auto.faiss").is_file() and (folder / "index-feature-auto.faiss").is_file()
    np.testing.assert_array_equal(other.features, first.features)
    query = other.encode(QUERIES[:1]).search(0)
    expected, _ = brute_force(other.features, query.feature, 5)
    assert other.candidates(query, 5).indices.tolist() == expected.tolist()
