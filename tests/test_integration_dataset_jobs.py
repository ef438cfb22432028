"""Dataset jobs (`inputs_from`) over two real worker processes: shards any worker takes, in input order, each
shard's items readable as it ends; a shard whose worker was SIGKILLed is redone; cancel keeps what was done.

Each job's items are checked against this process's own engine on the same inputs (not
against the service's cache, which a dataset job and inline jobs share).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from fastif import DataSpec, InfluenceEngine, Query
from fastif.applications import rank_self_influence
from fastif.config import SolverConfig
from live_stack import live_stack, wait_for  # noqa: F401  (fixture)
from records import inflight
from tiny import LABELS, sentences, write_jsonl
from api_schemas import ExplainItem
from workers.results import explain_items, result_items, stored_items

pytestmark = pytest.mark.integration

INPUTS = 150
SHARD = 32  # 5 shards, the last of 22
# LiSSA (about 2 s for a shard of 4 inputs here) so that a kill or a cancel lands while shards run.
SLOW = {"solver": "lissa", "lissa": {"depth": 100, "batch_size": 4}}


@pytest.fixture(scope="module")
def model(live_stack):  # noqa: F811
    model = live_stack.register()
    assert model["status"] == "ready", model
    rows = sentences(INPUTS, seed=11)
    for row in rows[::3]:
        del row["label"]  # a row without a label is taken with the predicted one
    write_jsonl(live_stack.data_root / "inputs" / "dev.jsonl", rows)
    (live_stack.data_root / "out").mkdir()
    return model


@pytest.fixture(scope="module")
def engine(live_stack, model) -> InfluenceEngine:  # noqa: F811
    engine = InfluenceEngine.from_paths(live_stack.data_root / "model", DataSpec(str(live_stack.data_root / "train.jsonl")))
    engine.prepare()
    return engine


def queries(data_root: Path) -> list[Query]:
    rows = [json.loads(line) for line in (data_root / "inputs" / "dev.jsonl").read_text().splitlines()]
    return [Query(text=row["text"], label=LABELS.index(row["label"]) if "label" in row else None) for row in rows]


def post(live_stack, route: str, body: dict) -> dict:  # noqa: F811
    response = live_stack.client.post(route, json=body)
    assert response.status_code == 202, response.text
    return response.json()


def shard_fields(live_stack, job_id: str, field: str) -> dict[int, str]:  # noqa: F811
    record = live_stack.redis.hgetall(f"fastif:job:{job_id}")
    return {int(key.split("_")[1]): value for key, value in record.items()
            if key.startswith("inputs_") and key.endswith(f"_{field}")}


def assert_same_items(items: list[dict], reference: list[dict]) -> None:
    """The same examples in the same order, and the same scores to float32's rounding of the item's largest one
    (a shard of many inputs scores all its rows against each chunk of candidates at once, a job of a few one row at a
    time: fastif/scoring.py)."""
    assert [i["input_index"] for i in items] == list(range(len(reference)))
    for ours, theirs in zip(items, reference, strict=True):
        assert ours["label_used"] == theirs["label_used"]
        scale = max(abs(e["score"]) for side in ("helpful", "harmful") for e in theirs[side])
        for side in ("helpful", "harmful"):
            assert [e["train_index"] for e in ours[side]] == [e["train_index"] for e in theirs[side]]
            assert [e["score"] for e in ours[side]] == pytest.approx([e["score"] for e in theirs[side]], rel=1e-5,
                                                                     abs=1e-5 * scale)


def test_an_influence_dataset_job_runs_in_shards_on_both_workers_in_input_order(live_stack, model, engine):  # noqa: F811
    body = {"model_id": model["id"], "k": 20, "top": 4, "output_path": "out/dev.influence.jsonl",
            "inputs_from": {"path": "inputs/dev.jsonl", "shard_inputs": SHARD}}
    cached_before = set(live_stack.redis.scan_iter("fastif:v1:*"))
    job = live_stack.wait_job(post(live_stack, "/v1/influence", body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert (job["inputs_total"], job["result_count"], job["progress"]["done"]) == (INPUTS, INPUTS, INPUTS)
    page = live_stack.client.get(f"/v1/jobs/{job['id']}/results", params={"offset": 30, "limit": 5}).json()
    assert page["total"] == INPUTS and [i["input_index"] for i in page["items"]] == [30, 31, 32, 33, 34]
    items = live_stack.results(job["id"])
    encoded, influences = engine.analyze(queries(live_stack.data_root), k=20)
    assert_same_items(items, result_items(engine, encoded, influences, 4))
    # Every shard once, taken by both workers; the stream and the output file hold the same items.
    assert shard_fields(live_stack, job["id"], "attempts") == dict.fromkeys(range(5), "1")
    assert {w.split(":", 1)[1].split("@")[0] for w in shard_fields(live_stack, job["id"], "worker").values()} == {
        "worker0", "worker1"}
    streamed = live_stack.client.get(f"/v1/jobs/{job['id']}/results.jsonl")
    assert [json.loads(line) for line in streamed.text.splitlines()] == items
    written = (live_stack.data_root / "out" / "dev.influence.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == items
    # Nothing cached per input: at an s_test's size per input, a large file would fill Redis.
    assert set(live_stack.redis.scan_iter("fastif:v1:*")) == cached_before
    # An inline job of the first inputs gives the same items.
    rows = [json.loads(line) for line in (live_stack.data_root / "inputs" / "dev.jsonl").read_text().splitlines()[:40]]
    inline = live_stack.wait_job(post(live_stack, "/v1/influence", {
        "model_id": model["id"], "k": 20, "top": 4, "inputs": [{"text": r["text"], "label": r.get("label")} for r in rows]})["id"])
    assert inline["status"] == "succeeded", inline["error"]
    assert_same_items(items[:40], live_stack.results(inline["id"]))


def test_explain_and_self_influence_dataset_jobs_equal_this_process(live_stack, model, engine):  # noqa: F811
    source = {"path": "inputs/dev.jsonl", "shard_inputs": 64, "limit": 100}
    explained = live_stack.wait_job(post(live_stack, "/v1/explain", {"model_id": model["id"], "k": 10, "top": 3,
                                                                    "inputs_from": source})["id"])
    assert explained["status"] == "succeeded", explained["error"]
    items = live_stack.results(explained["id"])
    encoded, influences = engine.analyze(queries(live_stack.data_root)[:100], k=10)
    reference = stored_items(ExplainItem, explain_items(engine, encoded, influences, 3))
    assert_same_items(items, reference)
    assert [i["agreement"] for i in items] == [r["agreement"] for r in reference]

    # Self-influence of the file's first examples, written as training examples, is the training set's own.
    train = [json.loads(line) for line in (live_stack.data_root / "train.jsonl").read_text().splitlines()]
    write_jsonl(live_stack.data_root / "inputs" / "train-head.jsonl", train[:40])
    job = live_stack.wait_job(post(live_stack, "/v1/self-influence", {
        "model_id": model["id"], "inputs_from": {"path": "inputs/train-head.jsonl", "shard_inputs": 16}})["id"])
    assert job["status"] == "succeeded", job["error"]
    items = live_stack.results(job["id"])
    assert [i["input_index"] for i in items] == list(range(40))
    ranked = {r["train_index"]: r for r in rank_self_influence(engine, list(range(40)), solver=SolverConfig())}
    for item in items:
        theirs = ranked[item["input_index"]]
        assert (item["text"], item["label"], item["predicted"]) == (theirs["text"], theirs["label"], theirs["predicted"])
        assert item["self_influence"] == pytest.approx(theirs["self_influence"], rel=1e-4)
        assert item["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)


def pool_children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running_shard(live_stack, job_id: str) -> tuple[int, str]:  # noqa: F811
    """A shard that has started and whose items are not stored yet, and its worker's name."""
    def started() -> dict[int, str]:
        stored = {int(s) for s in live_stack.redis.smembers(f"fastif:results:{job_id}:done")}
        return {s: w for s, w in shard_fields(live_stack, job_id, "worker").items() if s not in stored}
    shard, worker = next(iter(wait_for(started, bool, timeout_s=120, interval_s=0.01).items()))
    return shard, worker.split(":", 1)[1].split("@")[0]


def test_a_shard_whose_worker_was_killed_is_redone_and_the_job_is_whole(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "k": 10, "top": 2, **SLOW,
            "inputs_from": {"path": "inputs/dev.jsonl", "shard_inputs": 4, "limit": 16}}  # 4 shards
    job_id = post(live_stack, "/v1/influence", body)["id"]
    shard, victim = running_shard(live_stack, job_id)
    for child in pool_children(live_stack.worker_pids()[int(victim.removeprefix("worker"))]):
        os.kill(child, signal.SIGKILL)
    job = live_stack.wait_job(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert [i["input_index"] for i in live_stack.results(job_id)] == list(range(16))
    attempts = shard_fields(live_stack, job_id, "attempts")
    assert sorted(attempts) == list(range(4)) and attempts[shard] == "2", attempts


def test_cancel_mid_job_keeps_the_finished_shards_and_leaves_none_running(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "k": 10, "top": 2, **SLOW, "lissa": {**SLOW["lissa"], "seed": 3},
            "inputs_from": {"path": "inputs/dev.jsonl", "shard_inputs": 4, "limit": 40}}  # 10 shards
    job_id = post(live_stack, "/v1/influence", body)["id"]
    # Partial results while it runs: the first finished shards' items, in input order.
    partial = wait_for(lambda: live_stack.client.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000}).json(),
                       lambda page: page["total"] >= 4, timeout_s=120, interval_s=0.05)
    assert partial["items"] == sorted(partial["items"], key=lambda i: i["input_index"])
    assert live_stack.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    job = live_stack.wait_job(job_id, timeout_s=60)
    assert job["status"] == "cancelled"
    # No shard runs on: nothing left in flight, and no more items once the workers are idle.
    wait_for(lambda: [t for t in inflight.in_flight(live_stack.redis) if job_id in t.args], lambda t: not t,
             timeout_s=30)
    stored = sorted(int(s) for s in live_stack.redis.smembers(f"fastif:results:{job_id}:done"))
    page = live_stack.client.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000}).json()
    assert 1 <= len(stored) < 10
    assert [i["input_index"] for i in page["items"]] == [s * 4 + n for s in stored for n in range(4)]
    assert live_stack.client.get(f"/v1/jobs/{job_id}").json()["result_count"] == page["total"]
