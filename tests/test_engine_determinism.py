"""Reproducibility: seeds, LiSSA repeats, artefacts on disk, and LiSSA's divergence alarm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastif import CancelledError, DataSpec, InfluenceEngine, InfluenceSpec, LissaConfig, LissaDivergedError, Query
from fastif.curvature import lissa_generator
from fastif.stored_set import SETS_FOLDER
from tiny import make_tiny_family, sentences, write_jsonl

NUM_TRAIN = 30
QUERIES = [Query("the film was superb and warm"), Query("boring and sad story", label="positive")]
# The random tiny model's Hessian has eigenvalues from about -7 to 10: λ = damp·scale = 20 keeps
# H + λI positive definite, and scale = 200 stays above the largest eigenvalue of a sampled batch.
LISSA = LissaConfig(damp=0.1, scale=200.0, depth=40, batch_size=3, seed=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    model = make_tiny_family(root / "model", "bert", seed=2, initializer_range=0.3)
    train = write_jsonl(root / "train.jsonl", sentences(NUM_TRAIN, seed=4, noise=0.1))
    return model, train


def build(files, artefact_dir=None, params="auto") -> InfluenceEngine:
    model, train = files
    engine = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(params=params), artefact_dir=artefact_dir,
                                        device="cpu")
    engine.prepare()
    return engine


@pytest.fixture(scope="module")
def engine(files):
    return build(files)


@pytest.fixture(scope="module")
def vectors(engine):
    return engine.test_gradients(engine.encode(QUERIES))


def test_same_seed_gives_identical_s_test_and_scores(engine, vectors):
    first = engine.solve(vectors, LISSA).vectors
    second = engine.solve(vectors, LISSA).vectors
    assert torch.equal(first, second)
    _, a = engine.analyze(QUERIES, k=0, solver=LISSA)
    _, b = engine.analyze(QUERIES, k=0, solver=LISSA)
    for x, y in zip(a, b):
        assert np.array_equal(x.scores, y.scores) and x.s_test_norm == y.s_test_norm
    # analyze solves for the same vectors
    assert [x.s_test_norm for x in a] == pytest.approx([float(s.norm()) for s in first], rel=1e-6)


def test_different_seed_gives_a_different_estimate(engine, vectors):
    first = engine.solve(vectors, LISSA).vectors
    other = engine.solve(vectors, LissaConfig(**{**LISSA.__dict__, "seed": 6})).vectors
    assert ((first - other).norm(dim=1) / first.norm(dim=1)).min() > 1e-3


def reference_lissa(engine: InfluenceEngine, vectors: torch.Tensor, config: LissaConfig) -> torch.Tensor:
    """LiSSA written out: repeat r samples from lissa_generator(seed, r); the repeats are averaged."""
    estimates = []
    for repeat in range(config.repeats):
        generator = lissa_generator(config.seed, repeat)
        h = vectors.clone()
        for _ in range(config.depth):
            indices = torch.randint(engine.num_train, (config.batch_size,), generator=generator).tolist()
            h = vectors + (1 - config.damp) * h - engine.hvp(indices, h) / config.scale
        estimates.append(h / config.scale)
    return torch.stack(estimates).mean(dim=0)


def test_repeats_average_independent_streams(engine, vectors):
    two = LissaConfig(**{**LISSA.__dict__, "repeats": 2})
    solution = engine.solve(vectors, two)
    assert solution.iterations == 2 * LISSA.depth
    torch.testing.assert_close(solution.vectors, reference_lissa(engine, vectors, two), rtol=1e-5, atol=1e-8)
    # repeat 0 is the single run with the same seed; repeat 1 is a different stream
    single = engine.solve(vectors, LISSA).vectors
    torch.testing.assert_close(single, reference_lissa(engine, vectors, LISSA), rtol=1e-5, atol=1e-8)
    assert ((solution.vectors - single).norm(dim=1) / single.norm(dim=1)).min() > 1e-3


def test_artefacts_are_saved_and_loaded_back(files, tmp_path, monkeypatch):
    first = build(files, artefact_dir=tmp_path)
    folder = tmp_path / first.fingerprint
    for name in ("meta.json", "features.npy", "gradient_keys.npy", "index-gradient-auto.faiss", "prefix.npy",
                 "prefix_offsets.npy"):
        assert (folder / name).is_file(), name
    assert type(first.index).__name__ == "IndexFlatIP"  # the default kind "auto" is exactly Flat at this size
    _, expected = first.analyze(QUERIES, k=12, solver=LISSA)

    model, train = files
    second = InfluenceEngine.from_paths(model, DataSpec(str(train)), InfluenceSpec(), artefact_dir=tmp_path, device="cpu")
    assert second.fingerprint == first.fingerprint

    def no_recompute(*_args, **_kwargs):
        raise AssertionError("prepare() recomputed features instead of loading them")

    monkeypatch.setattr("fastif.training_set.encode_set", no_recompute)
    second.prepare()
    monkeypatch.undo()
    assert np.array_equal(second.features, first.features)
    assert np.array_equal(second.gradient_keys, first.gradient_keys)
    assert np.array_equal(np.asarray(second.prefix_store.flat), first.prefix_store.flat)
    _, loaded = second.analyze(QUERIES, k=12, solver=LISSA)
    for x, y in zip(expected, loaded):
        assert np.array_equal(x.indices, y.indices)
        assert np.array_equal(x.distances, y.distances)
        assert np.array_equal(x.scores, y.scores)


def test_artefacts_of_an_older_version_are_computed_again(files, tmp_path):
    first = build(files, artefact_dir=tmp_path)
    meta = tmp_path / first.fingerprint / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 1}))
    (tmp_path / first.fingerprint / "gradient_keys.npy").unlink()  # version 1 had none
    again = build(files, artefact_dir=tmp_path)
    assert json.loads(meta.read_text())["version"] > 1
    assert np.array_equal(again.gradient_keys, first.gradient_keys)
    assert np.array_equal(again.features, first.features)


def test_other_params_or_data_get_other_artefacts(files, tmp_path):
    base = build(files, artefact_dir=tmp_path)
    head_only = build(files, artefact_dir=tmp_path, params=("classifier",))
    assert head_only.fingerprint != base.fingerprint
    model, train = files
    other_train = write_jsonl(tmp_path / "other.jsonl", sentences(NUM_TRAIN, seed=99))
    other = InfluenceEngine.from_paths(model, DataSpec(str(other_train)), InfluenceSpec(), artefact_dir=tmp_path, device="cpu")
    assert other.fingerprint not in (base.fingerprint, head_only.fingerprint)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != SETS_FOLDER)
    assert folders == sorted([base.fingerprint, head_only.fingerprint])


def test_lissa_with_a_tiny_scale_stops_and_names_scale(engine, vectors):
    with pytest.raises(LissaDivergedError, match="'scale'") as info:
        engine.solve(vectors, LissaConfig(damp=0.01, scale=0.05, depth=500, batch_size=2))
    assert "diverged" in str(info.value)
    with pytest.raises(LissaDivergedError, match="'scale'"):
        engine.analyze(QUERIES, k=5, solver=LissaConfig(damp=0.01, scale=0.05, depth=500))


def test_cancellation_stops_lissa(engine, vectors):
    calls = []

    def cancel_after_three(stage, done, total):
        calls.append((stage, done, total))
        return done >= 3

    with pytest.raises(CancelledError):
        engine.solve(vectors, LISSA, on_progress=cancel_after_three)
    assert calls[-1] == ("s_test", 3, LISSA.depth)
