"""The default index ``auto`` (fastif/knn.py): exact Flat up to a size, above it IVF whose nprobe
the build chooses for a measured recall@1000 of the Flat neighbours; the report of what was built.

Clustered random vectors, so that IVF's cells have structure; the size threshold is monkeypatched
small so that IVF is built on a few thousand vectors.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from pydantic import ValidationError

from api_schemas import IndexSettings, Model
from fastif import knn
from fastif.config import IndexConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, DIM, CENTRES = 20_000, 16, 64


def clustered(n: int, seed: int, either_sign: bool) -> np.ndarray:
    """Points around CENTRES fixed centres; ``either_sign``: each point flipped or not, as gradient keys of either sign."""
    middles = np.random.default_rng(0).normal(size=(CENTRES, DIM)) * 4.0
    rng = np.random.default_rng(seed)
    points = middles[rng.integers(CENTRES, size=n)] + rng.normal(size=(n, DIM))
    if either_sign:
        points *= rng.choice([-1.0, 1.0], size=(n, 1))
    return points.astype(np.float32)


def exact(data: np.ndarray, query: np.ndarray, k: int, space: str) -> np.ndarray:
    """Brute force in float64: the k largest |⟨x, query⟩| (gradient) or the k smallest L2 distances (feature)."""
    data, query = data.astype(np.float64), query.astype(np.float64)
    if space == "gradient":
        return np.argsort(-np.abs(data @ query), kind="stable")[:k]
    return np.argsort(((data - query) ** 2).sum(axis=1), kind="stable")[:k]


def recall(index: faiss.Index, data: np.ndarray, queries: np.ndarray, space: str, k: int = knn.RECALL_AT) -> float:
    return float(np.mean([np.intersect1d(knn.search(index, q, k), exact(data, q, k, space)).size / k for q in queries]))


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(knn, "AUTO_FLAT_MAX_EXAMPLES", 5_000)


def test_auto_is_the_default_and_the_threshold_is_200k():
    assert IndexConfig().kind == "auto" and IndexConfig().recall_target == 0.95
    assert knn.AUTO_FLAT_MAX_EXAMPLES == 200_000 and knn.RECALL_AT == 1000
    assert IndexSettings().kind == "auto"


@pytest.mark.parametrize("space", ["gradient", "feature"])
def test_auto_is_exact_flat_up_to_the_threshold(space, small_threshold):
    data = clustered(5_001, seed=1, either_sign=space == "gradient")
    flat = faiss.IndexFlatIP if space == "gradient" else faiss.IndexFlatL2
    up_to = knn.build_index(data[:5_000], IndexConfig(space=space))
    assert type(up_to) is flat and up_to.ntotal == 5_000
    assert knn.index_report(up_to, data[:5_000]) == knn.IndexReport("flat", None, None, 1.0, 0)
    above = knn.build_index(data, IndexConfig(space=space))
    assert isinstance(above, faiss.IndexIVFFlat) and above.ntotal == 5_001
    # below the threshold "auto" answers exactly what "flat" answers
    index = knn.build_index(data[:300], IndexConfig(space=space))
    same = knn.build_index(data[:300], IndexConfig(kind="flat", space=space))
    for query in data[:5]:
        assert np.array_equal(knn.search(index, query, 40), knn.search(same, query, 40))


@pytest.mark.parametrize("space", ["gradient", "feature"])
def test_auto_chooses_the_least_nprobe_that_meets_the_recall_target(space, small_threshold, tmp_path):
    data = clustered(N, seed=2, either_sign=space == "gradient")
    built = knn.build_index(data, IndexConfig(space=space))
    index = knn.write_index(data, IndexConfig(space=space), tmp_path / "index.faiss")  # as a build keeps it, on disk
    assert index.nprobe == built.nprobe  # stored with the index
    assert isinstance(index, faiss.IndexIVFFlat)
    assert index.nlist == knn.default_nlist(N) == min(N // 39, int(4 * math.sqrt(N))) == 512
    # L2 cells: of the features, or of the gradient keys lifted onto a sphere (one number more)
    assert index.metric_type == faiss.METRIC_L2 and index.d == DIM + (space == "gradient")
    nprobe = index.nprobe
    assert 1 < nprobe < index.nlist  # neither end: the search did work

    report = knn.index_report(index, data)
    assert (report.kind, report.nlist, report.nprobe, report.queries) == ("ivf", 512, nprobe, knn.RECALL_QUERIES)
    assert report.recall_at_1000 >= 0.95
    assert report.to_dict() == {"kind": "ivf", "nlist": 512, "nprobe": nprobe, "recall_at_1000": report.recall_at_1000,
                                "queries": 64}
    # the measured queries, against a brute-force search in float64: the same recall
    sample = knn.RecallSample.of(data, space == "gradient")
    assert len(sample.keys) == 64 and sample.k == 1000
    assert recall(index, data, sample.keys, space) == pytest.approx(report.recall_at_1000, abs=2e-3)
    # held-out queries of the same distribution are found as well
    assert recall(index, data, clustered(40, seed=3, either_sign=space == "gradient"), space) >= 0.93
    # and an eighth of a power of two fewer probes would not have been enough
    granule = max(1, (1 << (nprobe - 1).bit_length()) // 8)
    index.nprobe = nprobe - granule
    assert knn.measure_recall(index, data)[0] < 0.95


def keys_of_varied_norms(n: int, seed: int) -> np.ndarray:
    """Gradient keys as a trained model gives them: of either sign, their norms a thousandfold apart."""
    rng = np.random.default_rng(seed)
    return (clustered(n, seed, either_sign=True) * np.exp(rng.uniform(-3.5, 3.5, size=(n, 1)))).astype(np.float32)


def test_the_lifted_keys_lie_on_a_sphere_and_keep_every_inner_product(monkeypatch):
    monkeypatch.setattr(knn, "ADD_CHUNK", 97)  # the radius is found a chunk at a time
    data = keys_of_varied_norms(1_000, seed=11)
    lift = knn.SphereLift(data)
    rows = lift[:]
    assert rows.shape == lift.shape == (1_000, DIM + 1) and rows.dtype == np.float32
    norms = np.linalg.norm(data.astype(np.float64), axis=1)
    assert np.sqrt(lift.radius_squared) == pytest.approx(norms.max(), rel=1e-6)
    assert np.allclose(np.linalg.norm(rows.astype(np.float64), axis=1), norms.max(), rtol=1e-5)
    assert np.array_equal(rows[:, :DIM], data) and np.array_equal(lift[np.array([7, 3])], rows[[7, 3]])
    query = knn.SphereLift.query(data[:2])
    assert np.array_equal(query[:, :DIM], data[:2]) and (query[:, DIM] == 0).all()
    # ‖q' − x'‖² = ‖q‖² + R² − 2⟨q, x⟩: the nearest lifted rows are the largest inner products
    distances = ((rows[None, :, :].astype(np.float64) - query[:, None, :]) ** 2).sum(axis=2)
    products = data[:2].astype(np.float64) @ data.T.astype(np.float64)
    shift = (norms[:2] ** 2)[:, None] + lift.radius_squared
    assert np.allclose(distances, shift - 2 * products, rtol=1e-5, atol=1e-3 * shift.max())


def test_a_lifted_ivf_probing_every_cell_finds_the_largest_products_of_both_signs():
    data = keys_of_varied_norms(3_000, seed=12)
    index = knn.build_index(data, IndexConfig(kind="ivf", nlist=32, nprobe=32))
    assert knn.lifted(index, DIM) and index.nprobe == index.nlist  # every cell: an exact search
    for query in keys_of_varied_norms(10, seed=13):
        found = knn.search(index, query, 100)
        truth = exact(data, query, 100, "gradient")
        assert np.intersect1d(found, truth).size >= 99  # float32 ties at the boundary at most
        products = data[found].astype(np.float64) @ query
        assert (products > 0).any() and (products < 0).any()
        assert np.all(np.diff(np.abs(products)) <= 1e-4 * np.abs(products).max())  # strongest first
        for side, sign in (("aligned", 1.0), ("opposed", -1.0)):
            ids = knn.search(index, query, 50, side)
            assert np.intersect1d(ids, np.argsort(-sign * (data.astype(np.float64) @ query))[:50]).size >= 49


def test_the_recall_sample_holds_the_exact_neighbours_of_both_signs():
    data = clustered(3_000, seed=4, either_sign=True)
    sample = knn.RecallSample.of(data, inner_product=True)
    again = knn.RecallSample.of(data, inner_product=True)
    assert np.array_equal(sample.keys, again.keys)  # fixed queries: every build measures the same ones
    assert all((data == key).all(axis=1).any() for key in sample.keys)  # training keys
    for key, ids in zip(sample.keys, sample.exact):
        truth = exact(data, key, 1000, "gradient")
        assert len(ids) == 1000 and np.intersect1d(ids, truth).size >= 998  # float32 ties at the boundary at most
        products = data[ids].astype(np.float64) @ key
        assert (products > 0).any() and (products < 0).any()  # both sides searched
    flat = knn.build_index(data, IndexConfig(kind="flat"))
    assert sample.recall(flat) == 1.0


def test_a_zero_key_is_no_query():
    data = clustered(500, seed=5, either_sign=True)
    data[::2] = 0.0  # half the keys are zero: a zero key ranks every example alike
    sample = knn.RecallSample.of(data, inner_product=True)
    assert 0 < len(sample.keys) < 64 and (np.linalg.norm(sample.keys, axis=1) > 0).all()


def test_recall_queries_are_distinct_rows_and_small_keys_still_count():
    data = clustered(40, seed=7, either_sign=True) * 1e-3  # fewer rows than queries, every key's norm below 1
    data[5] = 0.0
    sample = knn.RecallSample.of(data, inner_product=False)
    assert np.array_equal(sample.keys, data)  # every row once, in row order
    signed = knn.RecallSample.of(data, inner_product=True)
    assert np.array_equal(signed.keys, np.delete(data, 5, axis=0))  # only the zero key dropped, however small the rest
    assert signed.k == 40


def test_recall_of_no_query_or_of_a_single_neighbour_is_one():
    zeros = np.zeros((10, DIM), dtype=np.float32)
    nothing = knn.RecallSample.of(zeros, inner_product=True)
    assert len(nothing.keys) == 0 and nothing.recall(knn.build_index(zeros, IndexConfig(kind="flat"))) == 1.0
    single = clustered(1, seed=8, either_sign=False)
    alone = knn.RecallSample.of(single, inner_product=False)
    assert alone.k == 1 and alone.recall(knn.build_index(single, IndexConfig(kind="flat", space="feature"))) == 1.0


def centroids(index: faiss.IndexIVF) -> np.ndarray:
    return index.quantizer.reconstruct_n(0, index.nlist)


def test_auto_trains_on_the_sample_and_an_explicit_ivf_on_every_vector(small_threshold):
    data = clustered(6_000, seed=9, either_sign=False)
    nlist = 8  # 64 training points a cell: a sample of 512 of the 6,000
    auto = knn.build_index(data, IndexConfig(kind="auto", space="feature", nlist=nlist, recall_target=0.5))
    explicit = knn.build_index(data, IndexConfig(kind="ivf", space="feature", nlist=nlist))

    def trained_on(vectors):
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(DIM), DIM, nlist, faiss.METRIC_L2)
        index.train(vectors)
        return centroids(index)

    np.testing.assert_allclose(centroids(auto), trained_on(knn._training_sample(data, nlist)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(centroids(explicit), trained_on(data), rtol=1e-5, atol=1e-5)
    assert np.abs(centroids(auto) - centroids(explicit)).max() > 0.01


def test_auto_keeps_one_probe_when_one_meets_the_target(small_threshold):
    data = clustered(6_000, seed=10, either_sign=False)
    index = knn.build_index(data, IndexConfig(space="feature", nlist=8, recall_target=0.05))
    measured = knn.measure_recall(index, data)[0]
    assert index.nprobe == 1 and measured >= 0.05
    # a target the recall at one probe meets exactly is met
    exactly = knn.build_index(data, IndexConfig(space="feature", nlist=8, recall_target=measured))
    assert exactly.nprobe == 1


def test_auto_trains_ivf_on_a_sample():
    data = clustered(30_000, seed=6, either_sign=False)
    nlist = 100
    sample = knn._training_sample(data, nlist)
    assert sample.shape == (knn.TRAINING_POINTS_PER_CELL * nlist, DIM)
    assert np.array_equal(sample, knn._training_sample(data, nlist))  # the same sample every build
    assert len(np.unique(sample, axis=0)) == len(sample)
    assert len(knn._training_sample(data[:1_000], nlist)) == 1_000  # fewer than 64 per cell: every one


@pytest.mark.parametrize("space", ["gradient", "feature"])
def test_explicit_ivf_keeps_its_nprobe_and_is_measured(space, small_threshold):
    data = clustered(N, seed=7, either_sign=space == "gradient")
    index = knn.build_index(data, IndexConfig(kind="ivf", space=space, nprobe=4))
    assert index.nprobe == 4 and index.nlist == 512
    report = knn.index_report(index, data)
    assert (report.kind, report.nlist, report.nprobe, report.queries) == ("ivf", 512, 4, 64)
    sample = knn.RecallSample.of(data, space == "gradient")
    assert report.recall_at_1000 == pytest.approx(recall(index, data, sample.keys, space), abs=2e-3)
    assert report.recall_at_1000 < 0.95  # 4 of 512 cells: measured, not tuned


def test_hnsw_is_reported_with_its_recall():
    data = clustered(3_000, seed=8, either_sign=False)
    index = knn.build_index(data, IndexConfig(kind="hnsw", space="feature"))
    report = knn.index_report(index, data)
    assert (report.kind, report.nlist, report.nprobe, report.queries) == ("hnsw", None, None, 64)
    assert 0.9 <= report.recall_at_1000 <= 1.0


@pytest.mark.parametrize("fields", [
    {"kind": "lsh"}, {"space": "cosine"}, {"nprobe": 0}, {"nlist": 0}, {"hnsw_m": 1},
    {"recall_target": 0.0}, {"recall_target": 1.5}, {"recall_target": float("nan")},
])
def test_bad_index_settings_are_refused(fields):
    with pytest.raises(ValueError):
        IndexConfig(**fields)


@pytest.mark.parametrize("kind", ["lsh", "", "AUTO", 3])
def test_the_api_refuses_unknown_kinds(kind):
    with pytest.raises(ValidationError):
        IndexSettings(kind=kind)


def test_the_model_resource_carries_the_index_report():
    report = knn.IndexReport(kind="ivf", nlist=512, nprobe=64, recall_at_1000=0.98, queries=64)
    model = Model.model_validate({"id": "m", "name": "m", "status": "ready", "created_at": "2025-01-01T00:00:00Z",
                                  "request": {"name": "m", "model_path": "model", "train_data": {"path": "t.jsonl"}},
                                  "index": report.to_dict()})
    assert model.index.model_dump() == report.to_dict()
    with pytest.raises(ValidationError):
        Model.model_validate({**model.model_dump(mode="json"), "index": {**report.to_dict(), "recall_at_1000": 1.5}})


def test_the_model_record_stores_the_index_report(redis_client):
    from records.models import ModelStore

    from api_schemas import ModelCreate

    store = ModelStore(redis_client)
    record = store.create(ModelCreate(name="m", model_path="model", train_data={"path": "train.jsonl"}))
    assert record.request.index.kind == "auto" and record.index is None
    report = knn.IndexReport(kind="flat", nlist=None, nprobe=None, recall_at_1000=1.0, queries=0)
    assert store.set_ready(record.id, "fp", 10, ["a", "b"], index=report.to_dict())
    assert store.get(record.id).index.model_dump() == report.to_dict()
    assert store.set_ready(record.id, "fp", 10, ["a", "b"])  # a build without a report leaves none behind
    assert store.get(record.id).index is None
