"""FastIF's parallel variant over two real worker processes, and a worker killed mid-shard."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fastif import DataSpec, InfluenceEngine, LissaConfig, Query
from live_stack import live_stack, wait_for  # noqa: F401  (fixture)
from workers.results import result_items

pytestmark = pytest.mark.integration

LISSA = {"damp": 0.01, "scale": 1000.0, "depth": 80, "batch_size": 2, "repeats": 1, "seed": 7}
TEXTS = ["the film was really good", "awful boring plot"]


@pytest.fixture(scope="module")
def model(live_stack):  # noqa: F811
    model = live_stack.register()
    assert model["status"] == "ready", model
    return model


def averaged_reference(data_root: Path, lissa: dict, shards: int, k: int, top: int) -> list[dict]:
    """Averaging single-worker s_test estimates seeded seed, seed+1, ...: what ``parallel`` promises."""
    engine = InfluenceEngine.from_paths(data_root / "model", DataSpec(str(data_root / "train.jsonl")))
    engine.prepare()
    plan = engine.plan([Query(t) for t in TEXTS])
    estimates = [engine.solve(plan.vectors, LissaConfig(**{**lissa, "seed": lissa["seed"] + w})).vectors
                 for w in range(shards)]
    averaged = sum(estimates) / shards
    influences = engine.influences(plan, averaged, k, True, [False] * len(TEXTS))
    return result_items(engine, plan.encoded, influences, top)


def assert_matches(items: list[dict], reference: list[dict]) -> None:
    for ours, theirs in zip(items, reference, strict=True):
        for side in ("helpful", "harmful"):
            assert [e["train_index"] for e in ours[side]] == [e["train_index"] for e in theirs[side]]
            for a, b in zip(ours[side], theirs[side]):
                assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-9)


def shard_workers(live_stack, job_id: str) -> set[str]:  # noqa: F811
    record = live_stack.redis.hgetall(f"fastif:job:{job_id}")
    return {value.split(":", 1)[1] for key, value in record.items() if key.startswith("stest_") and key.endswith("_worker")}


def test_parallel_two_equals_the_average_of_two_seeded_estimates(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "inputs": [{"text": t} for t in TEXTS], "k": 25, "top": 6,
            "lissa": {**LISSA, "depth": 1500}, "parallel": 2}
    job = live_stack.wait_job(live_stack.submit(body)["id"])
    assert job["status"] == "succeeded", job["error"]
    items = live_stack.results(job["id"])
    assert_matches(items, averaged_reference(live_stack.data_root, {**LISSA, "depth": 1500}, 2, 25, 6))
    record = live_stack.redis.hgetall(f"fastif:job:{job['id']}")
    assert record["stest_shards_done"] == "2" and record["score_shards_done"] == "2"
    assert shard_workers(live_stack, job["id"]) == {"worker0@" + os.uname().nodename, "worker1@" + os.uname().nodename}


def pool_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def test_a_worker_killed_mid_shard_is_redelivered_and_the_job_succeeds(live_stack, model):  # noqa: F811
    lissa = {**LISSA, "depth": 1500, "seed": 21}  # long enough to be mid-shard when the kill comes (~7 s per shard)
    body = {"model_id": model["id"], "inputs": [{"text": t} for t in TEXTS], "k": 25, "top": 6,
            "lissa": lissa, "parallel": 2}
    job = live_stack.submit(body)
    wait_for(lambda: live_stack.redis.hgetall(f"fastif:job:{job['id']}"),
             lambda r: "stest_0_worker" in r and "stest_1_worker" in r and int(r.get("done") or 0) > 0,
             timeout_s=120, interval_s=0.05)
    victim = live_stack.worker_pids()[0]
    children = pool_children(victim)
    assert children, "the worker has no pool process"
    for child in children:
        os.kill(child, signal.SIGKILL)
    final = live_stack.wait_job(job["id"], timeout_s=300)
    assert final["status"] == "succeeded", final["error"]
    record = live_stack.redis.hgetall(f"fastif:job:{job['id']}")
    attempts = sorted(int(record.get(f"stest_{w}_attempts", 0)) for w in range(2))
    assert attempts == [1, 2], record  # exactly the killed shard ran twice
    items = live_stack.results(job["id"])
    assert len(items) == 2 and [i["input_index"] for i in items] == [0, 1]
    assert_matches(items, averaged_reference(live_stack.data_root, lissa, 2, 25, 6))
