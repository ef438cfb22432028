"""The real stack for integration tests: a real Redis, real Celery worker processes, the API.

Import the fixtures into a test module with ``from live_stack import live_stack, ...``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from conftest import _FLUSH_KEEP_LOCK, LOCK_KEY, LOCK_TTL_S
from fastif_cli.stack import Stack, free_port, start_stack
from tiny import make_tiny_bert, sentences, write_jsonl


@dataclass
class LiveStack:
    stack: Stack
    url: str
    redis_url: str
    data_root: Path
    client: httpx.Client

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def worker_pids(self) -> list[int]:
        return [proc.pid for name, proc in self.stack.children if name.startswith("worker")]

    def register(self, name: str = "tiny", model_path: str = "model", train: str = "train.jsonl", **extra) -> dict:
        body = {"name": name, "model_path": model_path, "train_data": {"path": train}, **extra}
        response = self.client.post("/v1/models", json=body)
        assert response.status_code == 202, response.text
        model = response.json()
        return wait_for(lambda: self.client.get(f"/v1/models/{model['id']}").json(),
                        lambda m: m["status"] != "building", timeout_s=120)

    def submit(self, body: dict, **headers) -> dict:
        response = self.client.post("/v1/influence", json=body, headers=headers)
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        return response.json()

    def wait_job(self, job_id: str, timeout_s: float = 180) -> dict:
        return wait_for(lambda: self.client.get(f"/v1/jobs/{job_id}").json(),
                        lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout_s=timeout_s)

    def results(self, job_id: str) -> list[dict]:
        page = self.client.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000}).json()
        return page["items"]


def wait_for(read, done, timeout_s: float = 60, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last value: {value}")
        time.sleep(interval_s)


def make_data_root(root: Path, train_rows: int = 60) -> Path:
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(train_rows, seed=2, noise=0.1))
    return root


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory, redis_url) -> Iterator[LiveStack]:
    """Two single-process workers and the API on a free port, against the session's Redis DB."""
    root = make_data_root(tmp_path_factory.mktemp("data-root"))
    logs = tmp_path_factory.mktemp("logs")
    # Empty the DB but keep this session's claim on it (conftest): a bare FLUSHDB dropped the
    # claim, and another test session could then take the same DB while these workers run.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, client.get(LOCK_KEY) or "held", LOCK_TTL_S)
    client.close()
    stack, url, used_redis = start_stack("127.0.0.1", free_port(), workers=2, log_dir=logs,
                                         extra_env={"REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root)})
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield LiveStack(stack, url, used_redis, root, client)
    finally:
        stack.stop(grace_s=10)
