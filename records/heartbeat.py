"""Worker heartbeats: a key per worker that expires unless the worker keeps beating."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from . import keys
from ._codec import text

HEARTBEAT_TTL_S = 30


def beat(client: redis.Redis, hostname: str, info: dict[str, Any], ttl_s: int = HEARTBEAT_TTL_S) -> None:
    """Say this worker is alive for the next `ttl_s` seconds, with what it offers in `info`."""
    record = {**info, "hostname": hostname, "ts": time.time()}
    client.set(keys.worker(hostname), json.dumps(record), ex=ttl_s)


def alive_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """The `info` of every worker whose heartbeat has not expired."""
    names = list(client.scan_iter(match=keys.WORKER_PATTERN, count=100))
    if not names:
        return []
    workers = []
    for raw in client.mget(names):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            workers.append(json.loads(text(raw) or ""))
        except ValueError:
            continue
    return workers
