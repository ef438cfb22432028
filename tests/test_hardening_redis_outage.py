"""Redis stopped and restarted under a running stack (API under uvicorn and two workers).

While Redis is down every route that needs it answers 503 problem+json (never 500, never a
hang), and once it is back the same API and worker processes serve again: reads, a new
job end to end, and the job that was running when Redis went away.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from fastif_cli.stack import free_port, start_stack
from live_stack import LiveStack, make_data_root, wait_for
from test_hardening_faults import LISSA, start_private_redis, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBLEM = "https://fastif.dev/problems/"
QUICK = {**LISSA, "depth": 50}


def requests_while_down(model_id: str, job_id: str) -> list[tuple[str, str, dict | None]]:
    body = {"model_id": model_id, "inputs": [{"text": "asked while redis is down"}], "k": 5,
            "lissa": {**QUICK, "depth": 5}}
    return [
        ("GET", "/readyz", None),
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{model_id}", None),
        ("POST", "/v1/models", {"name": "t", "model_path": "model", "train_data": {"path": "train.jsonl"}}),
        ("DELETE", "/v1/models/not-a-model", None),
        ("POST", "/v1/influence", body),
        ("GET", "/v1/jobs", None),
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{job_id}/results", None),
        ("POST", f"/v1/jobs/{job_id}/cancel", None),
    ]


def test_redis_down_is_503_and_the_stack_heals_without_a_restart(tmp_path: Path) -> None:
    root = make_data_root(tmp_path / "root")
    logs = tmp_path / "logs"
    logs.mkdir()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    port = free_port()
    # Persistent (append-only file), like a production Redis: a restart keeps the records.
    server = start_private_redis(port, redis_dir, persistent=True)
    redis_url = f"redis://127.0.0.1:{port}/0"
    stack, url, _ = start_stack("127.0.0.1", free_port(), workers=2, log_dir=logs,
                                extra_env={"REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root)})
    pids = {name: proc.pid for name, proc in stack.children}
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            live = LiveStack(stack, url, redis_url, root, client)
            model = live.register()
            assert model["status"] == "ready", model
            before = live.wait_job(live.submit({"model_id": model["id"], "inputs": [{"text": "before"}], "k": 10,
                                                "lissa": QUICK})["id"])
            assert before["status"] == "succeeded"

            # A job in flight when Redis goes away.
            inflight = live.submit({"model_id": model["id"], "inputs": [{"text": "in flight"}], "k": 10,
                                    "lissa": {**LISSA, "depth": 600, "seed": 5}})["id"]
            wait_for(lambda: client.get(f"/v1/jobs/{inflight}").json(),
                     lambda j: j["status"] == "running" and j["progress"]["done"] > 0, timeout_s=60)

            stop_process(server)
            seen: Counter = Counter()
            down_until = time.monotonic() + 5
            while time.monotonic() < down_until:
                for method, path, body in requests_while_down(model["id"], inflight):
                    started = time.monotonic()
                    response = client.request(method, path, json=body)
                    assert time.monotonic() - started < 10, (method, path)  # fails fast, no hang
                    assert response.status_code == 503, (method, path, response.status_code, response.text)
                    assert response.headers["content-type"].startswith("application/problem+json")
                    problem = response.json()
                    assert problem["type"] == PROBLEM + "redis-unavailable", problem
                    assert int(response.headers["retry-after"]) > 0
                    seen[(method, path)] += 1
                assert client.get("/healthz").status_code == 200
                metrics = client.get("/metrics")
                assert metrics.status_code == 200 and "fastif_redis_up 0.0" in metrics.text
            assert len(seen) == 10 and min(seen.values()) >= 1

            server = start_private_redis(port, redis_dir, persistent=True)  # same port, same data
            assert not stack.dead()
            assert {name: proc.pid for name, proc in stack.children} == pids  # nothing was restarted

            # Reads work again at once (the client reconnects), records survived.
            response = wait_for(lambda: client.get(f"/v1/jobs/{before['id']}"), lambda r: r.status_code == 200,
                                timeout_s=10)
            assert response.json()["status"] == "succeeded"
            assert client.get(f"/v1/models/{model['id']}").json()["status"] == "ready"
            wait_for(lambda: client.get("/readyz").status_code, lambda s: s == 200, timeout_s=60)

            # A new job end to end: the worker consumes from the restarted broker.
            after = live.wait_job(live.submit({"model_id": model["id"], "inputs": [{"text": "after"}], "k": 10,
                                               "lissa": {**QUICK, "seed": 6}})["id"], timeout_s=180)
            assert after["status"] == "succeeded", after
            assert live.results(after["id"])[0]["input_index"] == 0
            # The job that was running during the outage finishes too (retried, not lost).
            final = live.wait_job(inflight, timeout_s=180)
            assert final["status"] == "succeeded", final
            assert len(live.results(inflight)) == 1
    finally:
        stack.stop(grace_s=10)
        stop_process(server)
