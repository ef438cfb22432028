"""Whole results in Redis: the same request on the same model answers from here, marked `cached`."""

from __future__ import annotations

import json
from typing import Any

import redis

from api_schemas import Model
from records.keys import cache_key

from .runner import JobRun


def result_cache_key(model: Model, request, kind: str = "result") -> str:
    """Everything that changes the numbers, nothing that does not.

    The fingerprint covers the weights, the influence parameters and the data, so the same
    model registered twice shares its cache; its index (kind, space) picks other candidates.
    Where the results are also written (`output_path`) changes nothing in them.
    """
    payload = {**request.model_dump(mode="json", exclude={"model_id", "output_path"}),
               "index": model.request.index.model_dump(mode="json")}
    return cache_key(model.fingerprint or model.id, kind, payload)


def cached_results(run: JobRun, key: str) -> list[dict[str, Any]] | None:
    """The stored items of an earlier job with the same key, each with ``diagnostics.cached`` set."""
    raw = run.ctx.redis.get(key)
    if raw is None:
        return None
    items = json.loads(raw)
    for item in items:
        item["diagnostics"]["cached"] = True
    return items


def store_results(run: JobRun, key: str, items: list[dict[str, Any]]) -> None:
    """Keep the items (as stored) for the next job with the same key."""
    try:
        run.ctx.redis.set(key, json.dumps(items, separators=(",", ":")), ex=run.ctx.settings.cache_ttl_s)
    except redis.RedisError:
        pass  # only the cache of results: the job's own results are stored by runner.finish
