"""Faults on a live stack: worker pool processes SIGKILLed mid-batch, a job whose worker keeps
dying, a pickle message thrown at a real worker, and a worker SIGKILLed whole (main process and
pool) and restarted under the same name.

The stack: a private redis-server on its own port, two single-process Celery workers and
the API under uvicorn (fastif_cli.stack.start_stack), with FASTIF_MAX_DELIVERIES=2 and
heartbeats every second (so that a dead worker's tasks are sent again within seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bench.chaos import pool_children
from fastif_cli.stack import free_port, redis_server_binary, start_stack, stop_process
from live_stack import LiveStack, make_data_root, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_DELIVERIES = 2
# Workers write progress every 0.5 s, and a job counts as hit mid-way only when its progress
# moved inside the window of live_mid_jobs: its s_test must last several seconds. 300 steps
# took 2-3 s on a slow day of this machine and under 1 s on a fast one (then both workers were
# never seen mid-way at once); 1,200 keep several progress writes in the window on either.
LISSA = {"damp": 0.01, "scale": 1000.0, "depth": 1200, "batch_size": 2, "repeats": 1, "seed": 0}


def start_private_redis(port: int, workdir: Path, persistent: bool = False) -> subprocess.Popen:
    """A redis-server of our own on `port` (with an append-only file in `workdir` if persistent)."""
    argv = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
            "--save", "", "--appendonly", "yes" if persistent else "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    for _ in range(200):
        try:
            if client.ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def kill_pool_children(stack: LiveStack, worker_index: int | None = None) -> list[int]:
    """SIGKILL the pool process of one worker (or of all); returns the pids killed."""
    masters = stack.worker_pids()
    if worker_index is not None:
        masters = [masters[worker_index]]
    killed = []
    for master in masters:
        for child in pool_children(master):
            os.kill(child, signal.SIGKILL)
            killed.append(child)
    return killed


def job_record(stack: LiveStack, job_id: str) -> dict:
    return stack.redis.hgetall(f"fastif:job:{job_id}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LiveStack]:
    root = make_data_root(tmp_path_factory.mktemp("faults-root"))
    logs = tmp_path_factory.mktemp("faults-logs")
    port = free_port()
    server = start_private_redis(port, tmp_path_factory.mktemp("faults-redis"))
    redis_url = f"redis://127.0.0.1:{port}/0"
    try:
        running, url, _ = start_stack("127.0.0.1", free_port(), workers=2, log_dir=logs, extra_env={
            "REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root), "FASTIF_MAX_DELIVERIES": str(MAX_DELIVERIES),
            "FASTIF_HEARTBEAT_INTERVAL_S": "1"})
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                live = LiveStack(running, url, redis_url, root, client)
                live.logs = logs  # type: ignore[attr-defined]
                yield live
        finally:
            running.stop(grace_s=10)
    finally:
        stop_process(server)


@pytest.fixture(scope="module")
def model(stack: LiveStack) -> dict:
    model = stack.register()
    assert model["status"] == "ready", model
    return model


def test_a_batch_of_12_jobs_survives_sigkilled_pool_processes(stack: LiveStack, model: dict) -> None:
    inputs_of = {}
    jobs = []
    for i in range(12):
        # Distinct texts: no job may be answered from another's cache.
        inputs = [{"text": f"the film number {i} part {j} was really good"} for j in range(1 + i % 3)]
        job = stack.submit({"model_id": model["id"], "inputs": inputs, "k": 20, "top": 5,
                            "lissa": {**LISSA, "seed": i}})
        inputs_of[job["id"]] = len(inputs)
        jobs.append(job["id"])

    def live_mid_jobs() -> set[str]:
        """Jobs being worked on right now, between 10% and 60% of their s_test.

        Progress must move between two looks: a killed job keeps its last progress (and
        status running) until its redelivery comes round, and must not count.
        """
        before = {j: job_record(stack, j) for j in jobs}
        time.sleep(0.7)
        live = set()
        for j in jobs:
            now = job_record(stack, j)
            total, done = int(now.get("total") or 0), int(now.get("done") or 0)
            if (now.get("status") == "running" and now.get("stage") == "s_test" and total
                    and 0.1 * total <= done <= 0.6 * total and done > int(before[j].get("done") or 0)):
                live.add(j)
        return live

    # Both workers in the middle of a job: kill worker 0's pool process there.
    first = wait_for(live_mid_jobs, lambda live: len(live) == 2, timeout_s=120, interval_s=0)
    assert kill_pool_children(stack, 0)
    # Later in the batch, the other worker's pool process too.
    wait_for(lambda: sum(job_record(stack, j).get("status") == "succeeded" for j in jobs), lambda n: n >= 4,
             timeout_s=180)
    second = wait_for(live_mid_jobs, lambda live: len(live) == 2, timeout_s=120, interval_s=0)
    assert kill_pool_children(stack, 1)

    finals = [stack.wait_job(j, timeout_s=300) for j in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 12, [(f["id"], f["status"], f["error"]) for f in finals]

    redelivered = {f["id"] for f in finals if f["deliveries"] == 2}
    assert all(f["deliveries"] in (1, 2) for f in finals)
    assert len(redelivered) == 2, [(f["id"], f["deliveries"]) for f in finals]  # exactly the two killed jobs
    assert redelivered <= first | second

    listed = stack.client.get("/v1/jobs", params={"limit": 1000}).json()["items"]
    assert sorted(j["id"] for j in listed if j["kind"] == "influence") == sorted(jobs)  # no duplicate job
    for job_id in jobs:
        count = inputs_of[job_id]
        record = job_record(stack, job_id)
        assert int(record["result_count"]) == count
        assert stack.redis.llen(f"fastif:results:{job_id}") == count  # a redelivery did not append twice
        items = stack.results(job_id)
        assert [item["input_index"] for item in items] == list(range(count))
        for item in items:  # complete items, not partial ones: 20 scored candidates fill 5 places on one side at least
            helpful, harmful = [e["score"] for e in item["helpful"]], [e["score"] for e in item["harmful"]]
            assert 5 <= len(helpful) + len(harmful) <= 10 and len(helpful) <= 5 and len(harmful) <= 5
            assert all(s < 0 for s in helpful) and helpful == sorted(helpful)
            assert all(s > 0 for s in harmful) and harmful == sorted(harmful, reverse=True)
            assert item["prediction"]["label"] in ("negative", "positive")
            assert item["diagnostics"]["s_test_norm"] > 0 and set(item["diagnostics"]["seconds"]) >= {"s_test"}
    # Nothing is left in the queue or waiting for an ack.
    assert stack.redis.llen("accel") == 0
    wait_for(lambda: stack.redis.hlen("unacked"), lambda n: n == 0, timeout_s=30)


def test_a_job_whose_worker_keeps_dying_fails_after_the_redelivery_limit(stack: LiveStack, model: dict) -> None:
    body = {"model_id": model["id"], "inputs": [{"text": "a job that never gets to finish"}], "k": 20,
            "lissa": {**LISSA, "depth": 100_000, "seed": 99}}
    job_id = stack.submit(body)["id"]
    for delivery in range(1, MAX_DELIVERIES + 1):
        wait_for(lambda: job_record(stack, job_id),
                 lambda r: r.get("status") == "running" and int(r.get("deliveries") or 0) == delivery
                 and int(r.get("done") or 0) > 0, timeout_s=120, interval_s=0.05)
        assert kill_pool_children(stack)  # whichever worker has it
    final = stack.wait_job(job_id, timeout_s=120)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "redelivery-limit"
    assert f"limit {MAX_DELIVERIES}" in final["error"]["message"] and "died" in final["error"]["message"]
    assert final["deliveries"] == MAX_DELIVERIES + 1
    # It does not loop: the message is gone and the record stays as it is.
    wait_for(lambda: (stack.redis.llen("accel"), stack.redis.hlen("unacked")), lambda q: q == (0, 0), timeout_s=30)
    time.sleep(3)
    again = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert (again["status"], again["deliveries"]) == ("failed", MAX_DELIVERIES + 1)
    # The workers are fine afterwards.
    ok = stack.wait_job(stack.submit({**body, "lissa": {**LISSA, "seed": 100}})["id"])
    assert ok["status"] == "succeeded", ok


def test_a_pickle_message_is_refused_by_a_real_worker(stack: LiveStack, model: dict, tmp_path: Path) -> None:
    """Celery's own client, told to use pickle, sends a task whose unpickling would create a file."""
    from celery import Celery

    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    job = stack.client.post("/v1/influence", json={"model_id": model["id"], "inputs": [{"text": "decoy"}],
                                                   "k": 5, "lissa": {**LISSA, "depth": 5, "seed": 7}})
    assert job.status_code == 202
    evil = Celery("evil", broker=stack.redis_url, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    task_id = uuid.uuid4().hex
    with evil.connection_for_write() as connection:
        evil.send_task("fastif.influence", args=[Trap()], task_id=task_id, queue="accel", serializer="pickle",
                       connection=connection)
    evil.close()

    # The worker takes the message off the queue and refuses it; nothing is unpickled.
    wait_for(lambda: (stack.redis.llen("accel"), stack.redis.hlen("unacked")), lambda q: q == (0, 0), timeout_s=60)
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("worker-*.log"))  # type: ignore[attr-defined]
    assert "ContentDisallowed" in logs or "Refusing to deserialize" in logs
    assert not marker.exists()
    assert all(pool_children(pid) for pid in stack.worker_pids())  # the workers live on
    assert stack.wait_job(job.json()["id"])["status"] == "succeeded"



# Last in the module: the killed worker's own copy of the message stays in the broker's unacked set
# until the visibility timeout, which the pickle test above checks is empty.
def test_a_worker_killed_whole_has_its_task_sent_again_even_when_restarted_under_its_name(
        stack: LiveStack, model: dict) -> None:
    body = {"model_id": model["id"], "inputs": [{"text": "a worker dies whole under this one"}], "k": 20, "top": 5,
            "lissa": {**LISSA, "seed": 11}}
    job_id = stack.submit(body)["id"]
    record = wait_for(lambda: job_record(stack, job_id),
                      lambda r: r.get("stage") == "s_test" and int(r.get("done") or 0) > 0, timeout_s=120, interval_s=0.05)
    assert record["status"] == "running"
    entries = {task_id: json.loads(raw) for task_id, raw in stack.redis.hgetall("fastif:inflight").items()}
    (task_id, entry), = [(t, e) for t, e in entries.items() if e["args"] == [job_id]]
    index = int(entry["worker"].split("@")[0].removeprefix("worker"))
    position, (name, victim) = [(i, c) for i, c in enumerate(stack.stack.children) if c[0] == f"worker-{index}"][0]
    os.killpg(victim.pid, signal.SIGKILL)  # the main process and its pool: the broker never hears back
    victim.wait()
    # A new worker under the same hostname beats at once; its boot id tells the reaper it is not the dead one.
    replacement = stack.stack.start(name, [sys.executable, "-m", "fastif_cli.main", "worker", "--concurrency", "1",
                                           "--hostname", f"worker{index}@%h"], {
        **os.environ, "REDIS_URL": stack.redis_url, "FASTIF_DATA_ROOT": str(stack.data_root),
        "FASTIF_MAX_DELIVERIES": str(MAX_DELIVERIES), "FASTIF_HEARTBEAT_INTERVAL_S": "1", "FASTIF_TORCH_THREADS": "1"},
        stack.logs / f"worker-{index}-restarted.log")  # type: ignore[attr-defined]
    stack.stack.children.pop()
    stack.stack.children[position] = (name, replacement)

    final = stack.wait_job(job_id, timeout_s=120)
    assert final["status"] == "succeeded" and final["deliveries"] == 2, final
    assert task_id not in stack.redis.hgetall("fastif:inflight")
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("worker-*.log"))  # type: ignore[attr-defined]
    assert f"its worker {entry['worker']} died" in logs
    # The answer is the one a fault-free run gives: the same request again, with the caches emptied.
    items = stack.results(job_id)
    for key in stack.redis.scan_iter("fastif:v1:*"):
        stack.redis.delete(key)
    again = stack.wait_job(stack.submit({**body, "inputs": body["inputs"]}, **{"Idempotency-Key": "fresh"})["id"])
    assert again["deliveries"] == 1
    fresh = stack.results(again["id"])
    for got, want in zip(items, fresh, strict=True):
        for side in ("helpful", "harmful"):
            assert [e["train_index"] for e in got[side]] == [e["train_index"] for e in want[side]]
            assert [e["score"] for e in got[side]] == pytest.approx([e["score"] for e in want[side]], rel=1e-4)
