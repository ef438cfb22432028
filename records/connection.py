"""One configured redis-py client: short timeouts, retries and health checks, so a
Redis restart costs a few failed calls and then heals without restarting the process."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def make_redis(url: str, *, decode_responses: bool = True) -> redis.Redis:
    """A redis.Redis for `url` that retries briefly and re-checks idle connections."""
    return redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        # Re-validate a pooled connection idle longer than this before using it.
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
