"""FastIF's parallel variant when the shard count differs from the input count, over real worker processes.

tests/test_integration_parallel.py runs 2 inputs with ``parallel: 2``, where averaging the
shards' s_test over the number of inputs instead of the number of shards gives the same
numbers. Here one input is split over three shards (and three inputs over two), each
checked against the average of single-worker estimates seeded seed, seed+1, ... computed
by an engine of this process. tests/test_gaps_parallel.py runs the same shard functions
in-process, delivered in awkward orders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fastif import DataSpec, InfluenceEngine, LissaConfig, Query
from live_stack import live_stack, wait_for  # noqa: F401  (fixture)
from workers.results import result_items

pytestmark = pytest.mark.integration

LISSA = {"damp": 0.01, "scale": 1000.0, "depth": 300, "batch_size": 2, "repeats": 1, "seed": 5}
TEXTS = ["the film was really good", "awful boring plot", "quite a lovely story but weak acting"]


@pytest.fixture(scope="module")
def model(live_stack):  # noqa: F811
    model = live_stack.register()
    assert model["status"] == "ready", model
    return model


def averaged_reference(data_root: Path, texts: list[str], shards: int, k: int, top: int) -> list[dict]:
    engine = InfluenceEngine.from_paths(data_root / "model", DataSpec(str(data_root / "train.jsonl")))
    engine.prepare()
    plan = engine.plan([Query(t) for t in texts])
    estimates = [engine.solve(plan.vectors, LissaConfig(**{**LISSA, "seed": LISSA["seed"] + w})).vectors
                 for w in range(shards)]
    influences = engine.influences(plan, sum(estimates) / shards, k, True, [False] * len(texts))
    return result_items(engine, plan.encoded, influences, top)


def assert_matches(items: list[dict], reference: list[dict]) -> None:
    assert [i["input_index"] for i in items] == [r["input_index"] for r in reference]
    for ours, theirs in zip(items, reference, strict=True):
        for side in ("helpful", "harmful"):
            assert [e["train_index"] for e in ours[side]] == [e["train_index"] for e in theirs[side]]
            for a, b in zip(ours[side], theirs[side]):
                assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(("inputs", "shards"), [(1, 3), (3, 2)], ids=["1-input-3-shards", "3-inputs-2-shards"])
def test_parallel_with_more_or_fewer_shards_than_inputs_is_the_average_over_the_shards(live_stack, model,  # noqa: F811
                                                                                      inputs, shards):
    texts = TEXTS[:inputs]
    body = {"model_id": model["id"], "inputs": [{"text": t} for t in texts], "k": 25, "top": 6, "lissa": LISSA,
            "parallel": shards}
    job = live_stack.wait_job(live_stack.submit(body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    items = live_stack.results(job["id"])
    assert len(items) == inputs
    assert_matches(items, averaged_reference(live_stack.data_root, texts, shards, 25, 6))
    for item in items:
        assert item["diagnostics"]["shards"] == shards
        assert all(e["score"] < 0 for e in item["helpful"]) and all(e["score"] > 0 for e in item["harmful"])
    record = live_stack.redis.hgetall(f"fastif:job:{job['id']}")
    assert record["stest_shards_done"] == str(shards) and record["score_shards_done"] == str(shards)
    assert all(record.get(f"stest_{w}_attempts") == "1" for w in range(shards))
