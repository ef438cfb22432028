"""Per-process resources of a worker: settings, Redis clients and the record stores.

Created lazily in each pool process (after the fork), never at import time.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

import redis

from records.connection import make_redis
from records.jobs import JobStore
from records.models import ModelStore
from records.settings import Settings, get_settings


class WorkerContext:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def redis(self) -> redis.Redis:
        return make_redis(self.settings.effective_redis_url)

    @cached_property
    def redis_bytes(self) -> redis.Redis:
        """For tensors: raw bytes, no decoding."""
        return make_redis(self.settings.effective_redis_url, decode_responses=False)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.redis, result_ttl_s=self.settings.result_ttl_s)

    @cached_property
    def models(self) -> ModelStore:
        return ModelStore(self.redis)


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    return WorkerContext(get_settings())
