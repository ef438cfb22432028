"""The build in shards (fastif/staged_build.py): any order, any engine, stopped and resumed, gives one build's numbers.

The workers run these shards as Celery tasks (tests/test_integration_build_shards.py); here
separate engine objects stand in for separate processes, which share nothing but the folder.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fastif import CancelledError, DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec
from fastif.staged_build import STALE_BUILD_S, shard_ranges
from tiny import assert_same_build, make_tiny_family, sentences, write_jsonl

SHARD = 8  # 40 examples: shards of rows 0-8, 8-16, ..., 32-40

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("staged-model") / "model", "bert", seed=4)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    # Lengths that vary, so that how examples are batched matters to the rounding.
    return write_jsonl(tmp_path_factory.mktemp("staged-data") / "train.jsonl", sentences(40, seed=6, noise=0.1))


def engine_of(model_dir, train, artefacts, **index) -> InfluenceEngine:
    return InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(),
                                      IndexConfig(shard_examples=SHARD, **index), artefact_dir=artefacts, device="cpu")


@pytest.fixture(scope="module")
def whole(model_dir, train, tmp_path_factory):
    """One process, one prepare(): the build every other way must equal."""
    engine = engine_of(model_dir, train, tmp_path_factory.mktemp("whole"))
    engine.prepare()
    return engine


def test_shard_ranges_cover_every_row_once():
    assert shard_ranges(40, 8) == [range(0, 8), range(8, 16), range(16, 24), range(24, 32), range(32, 40)]
    assert shard_ranges(41, 8)[-1] == range(40, 41) and shard_ranges(0, 8) == []


def test_shards_in_any_order_by_other_engines_equal_one_build(model_dir, train, whole, tmp_path):
    first, second = engine_of(model_dir, train, tmp_path), engine_of(model_dir, train, tmp_path)
    build = first.staged_build()
    assert len(build.shards) == 5 and build.pending() == [0, 1, 2, 3, 4]
    for engine, shard in [(second, 4), (first, 0), (second, 2), (first, 1), (second, 2), (first, 3)]:
        engine.encode_shard(shard)  # shard 2 twice: a redelivered task writes the same rows again
    assert build.pending() == [] and not first.built()
    second.finish_build()
    assert_same_build(second, whole)
    assert second.built() and not build.path.exists()  # the staging folder became the artefacts
    first.finish_build()  # the other engine finds them finished and loads them
    assert_same_build(first, whole)


def test_a_build_kept_in_memory_runs_the_same_shards(model_dir, train, whole):
    in_memory = engine_of(model_dir, train, None)
    in_memory.prepare()
    assert_same_build(in_memory, whole)


def test_a_stopped_build_resumes_from_its_written_shards(model_dir, train, whole, tmp_path):
    stopped = engine_of(model_dir, train, tmp_path)
    with pytest.raises(CancelledError):  # cancelled in the third shard, after two were written
        stopped.prepare(on_progress=lambda stage, done, total: done >= 20)
    build = stopped.staged_build()
    assert build.pending() == [2, 3, 4] and build.examples_done() == 16
    assert not (stopped.artefact_dir / "meta.json").exists() and stopped.index is None
    # What a process killed mid-shard leaves: rows of shard 2 half written, no marker.
    staged = np.load(build.path / "features.npy", mmap_mode="r+")
    staged[16:20] = np.nan
    staged.flush()

    seen = []
    resumed = engine_of(model_dir, train, tmp_path)  # a registration again, in another process
    resumed.prepare(on_progress=lambda stage, done, total: seen.append(done) and False)
    assert min(seen) > 16  # the written shards were not encoded again
    assert_same_build(resumed, whole)


def test_finishing_before_every_shard_is_written_refuses(model_dir, train, tmp_path):
    engine = engine_of(model_dir, train, tmp_path)
    engine.encode_shard(0)
    with pytest.raises(RuntimeError, match="4 of the build's 5 shards are not written yet"):
        engine.finish_build()
    assert engine.index is None and not (engine.artefact_dir / "meta.json").exists()


def test_a_staging_folder_nobody_touched_for_a_day_is_removed(model_dir, train, tmp_path):
    old = engine_of(model_dir, train, tmp_path)
    old.encode_shard(0)
    stale = old.staged_build().path
    day_ago = time.time() - STALE_BUILD_S - 60
    os.utime(stale, (day_ago, day_ago))
    recent = engine_of(model_dir, train, tmp_path, prefix="recompute")  # another layout of the same fingerprint
    recent_build = recent.staged_build()
    recent.encode_shard(1)
    assert not stale.exists() and recent_build.path.is_dir() and recent_build.pending() == [0, 2, 3, 4]


def test_each_layout_and_shard_size_stages_apart(model_dir, train, tmp_path):
    paths = {engine_of(model_dir, train, tmp_path, **index).staged_build().path
             for index in ({}, {"prefix": "recompute"}, {"prefix_dtype": "float16"})}
    other_size = InfluenceEngine.from_paths(model_dir, DataSpec(str(train)), InfluenceSpec(),
                                            IndexConfig(shard_examples=16), artefact_dir=tmp_path, device="cpu")
    paths.add(other_size.staged_build().path)
    assert len(paths) == 4
