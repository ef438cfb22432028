"""An oversized body gets its 413 problem in every client, over real HTTP (uvicorn on loopback).

Clients that write the whole body before reading (urllib, httpx) used to see "Broken pipe" or
"Connection reset by peer": the server answered and closed while they were still sending.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from bench.load_poll import Service

pytestmark = pytest.mark.integration

LIMIT = 1_000_000  # FASTIF_MAX_BODY_BYTES' default
SIZES = {"1.5MB": 1_500_000, "2MB": 2_000_000, "10MB": 10_000_000}
BODY_TOO_LARGE = "https://fastif.dev/problems/body-too-large"


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    service = Service()
    try:
        yield service
    finally:
        service.stop()


def body(size: int) -> bytes:
    """A JSON influence request of about `size` bytes."""
    head = b'{"model_id": "m", "inputs": [{"text": "'
    tail = b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def assert_body_too_large(status: int, payload: bytes) -> None:
    assert status == 413
    problem = json.loads(payload)
    assert problem["type"] == BODY_TOO_LARGE
    assert str(LIMIT) in problem["detail"]


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_urllib_reads_the_413(service: Service, size: int) -> None:
    request = urllib.request.Request(f"{service.url}/v1/influence", data=body(size), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert_body_too_large(refused.value.code, refused.value.read())


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_httpx_reads_the_413(service: Service, size: int) -> None:
    response = httpx.post(f"{service.url}/v1/influence", content=body(size),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert_body_too_large(response.status_code, response.content)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_httpx_reads_the_413_of_a_chunked_body(service: Service, size: int) -> None:
    payload = body(size)

    def chunks():  # no Content-Length: the limit is passed while the body streams
        for start in range(0, len(payload), 65_536):
            yield payload[start:start + 65_536]

    response = httpx.post(f"{service.url}/v1/influence", content=chunks(),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert_body_too_large(response.status_code, response.content)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("expect", ["100-continue", ""], ids=["expect-100-continue", "no-expect"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_curl_reads_the_413(service: Service, size: int, expect: str, tmp_path) -> None:
    upload = tmp_path / "body.json"
    upload.write_bytes(body(size))
    done = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                           "-H", f"Expect: {expect}", "--data-binary", f"@{upload}", f"{service.url}/v1/influence"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    payload, _, status = done.stdout.rpartition(b"\n")
    assert_body_too_large(int(status), payload)


def test_the_connection_stays_usable_after_a_drained_413(service: Service) -> None:
    """A body the server read to the end leaves a clean keep-alive connection: the next request on it is answered."""
    with httpx.Client(base_url=service.url, timeout=30) as client:
        refused = client.post("/v1/influence", content=body(2_000_000), headers={"Content-Type": "application/json"})
        assert_body_too_large(refused.status_code, refused.content)
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/influence", content=body(3_000_000),
                           headers={"Content-Type": "application/json"}).status_code == 413


def test_a_body_past_the_drain_bound_is_refused_and_closed_without_reading_it_all(service: Service) -> None:
    """Past the bound (64 MB) the server stops reading: it answers 413, closes, and never buffers the body."""
    declared = 1 << 30  # 1 GiB declared, far past the drain bound; the client sends only what the server takes
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/influence HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(declared).encode() + b"\r\n\r\n")
        sock.sendall(b"x" * 100_000)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65_536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in answer.lower()
