"""Load: 200 concurrent clients polling job status against the API under uvicorn, with no error.

The short run of `bench/load_poll.py` (the 60-second run is `python bench/load_poll.py`;
its figures are in docs/hardening.md). wrk is the generator where installed (.ci/run
installs it), else an asyncio httpx client with the same 200 connections.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from bench.load_poll import Service, run_httpx, run_load, run_wrk, seed_jobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECONDS = 10
CONNECTIONS = 200


def test_200_clients_polling_job_status_see_no_error() -> None:
    result = run_load(duration_s=SECONDS, connections=CONNECTIONS, jobs=100)
    print(result.summary())
    assert result.generator == ("wrk" if shutil.which("wrk") else "httpx-asyncio")
    assert result.errors == 0, result.error_kinds
    assert result.connections == CONNECTIONS
    assert result.requests >= CONNECTIONS  # every client got answers
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


def test_load_with_api_keys_and_the_server_still_answers_after() -> None:
    """With keys configured, polled with the key: no error; and a wrong key is still refused after."""
    service = Service(api_keys="load-key")
    try:
        headers = {"X-API-Key": "load-key"}
        ids = seed_jobs(service.url, service.redis_url, 20, headers)
        if shutil.which("wrk"):
            result = run_wrk(service.url, ids, 50, 3, 2, headers)
        else:
            result = run_httpx(service.url, ids, 50, 3, headers)
        assert result.errors == 0, result.error_kinds
        assert httpx.get(f"{service.url}/v1/jobs/{ids[0]}", headers={"X-API-Key": "nope"}).status_code == 401
        assert httpx.get(f"{service.url}/v1/jobs/{ids[0]}", headers=headers).status_code == 200
        metrics = httpx.get(f"{service.url}/metrics", headers=headers).text
        assert 'route="/v1/jobs/{job_id}",status="200"' in metrics
        assert 'status="500"' not in metrics and 'status="503"' not in metrics
        # The body limit holds over real HTTP too, declared or streamed.
        big = b'{"model_id": "m", "inputs": [' + b'{"text": "x"},' * 100_000 + b'{"text": "x"}]}'
        response = httpx.post(f"{service.url}/v1/influence", content=big, headers={**headers,
                                                                                   "content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["type"] == "https://fastif.dev/problems/body-too-large"

        def chunks():
            for _ in range(200):
                yield b" " * 10_000

        response = httpx.post(f"{service.url}/v1/influence", content=chunks(),
                              headers={**headers, "content-type": "application/json"})
        assert response.status_code == 413
    finally:
        service.stop()
