"""The influence job: FastIF's query for each input (or the group), cached in Redis."""

from __future__ import annotations

import json

import redis

from api_schemas import InfluenceRequest, Model
from fastif import InfluenceEngine
from fastif.report import result_items
from records.keys import cache_key

from .configs import queries_of, solver_config
from .registry import engine_for
from .runner import JobFailed, JobRun
from .tensor_cache import RedisTensorCache


def ready_model(run: JobRun, model_id: str) -> Model:
    model = run.ctx.models.get(model_id)
    if model is None:
        raise JobFailed("model-not-found", f"no model {model_id} (it was deleted)")
    if model.status != "ready":
        raise JobFailed("model-not-ready", f"model {model_id} is {model.status}")
    return model


def result_cache_key(model: Model, request, kind: str = "result") -> str:
    """Everything that changes the numbers, nothing that does not.

    The fingerprint covers the weights, the influence parameters and the data, so the same
    model registered twice shares its cache; its index (kind, space) picks other candidates.
    Where the results are also written (`output_path`) changes nothing in them.
    """
    payload = {**request.model_dump(mode="json", exclude={"model_id", "output_path"}),
               "index": model.request.index.model_dump(mode="json")}
    return cache_key(model.fingerprint or model.id, kind, payload)


def cached_results(run: JobRun, key: str) -> list[dict] | None:
    raw = run.ctx.redis.get(key)
    if raw is None:
        return None
    items = json.loads(raw)
    for item in items:
        item["diagnostics"]["cached"] = True
    return items


def store_results(run: JobRun, key: str, items: list[dict]) -> None:
    try:
        run.ctx.redis.set(key, json.dumps(items, separators=(",", ":")), ex=run.ctx.settings.cache_ttl_s)
    except redis.RedisError:
        pass  # only the cache of results: the job's own results are stored by run_job


def engine_and_cache(run: JobRun, model: Model) -> tuple[InfluenceEngine, RedisTensorCache]:
    engine = engine_for(model, run.ctx.settings)
    engine.prepare()
    cache = RedisTensorCache(run.ctx.redis_bytes, model.fingerprint or engine.fingerprint, run.ctx.settings.cache_ttl_s)
    return engine, cache


def run_influence(run: JobRun, start_parallel=None) -> list[dict] | None:
    """One worker does it all, or (``parallel`` > 1 with LiSSA) hands it to shard tasks."""
    request = InfluenceRequest.model_validate(run.request)
    model = ready_model(run, request.model_id)
    key = result_cache_key(model, request)
    items = cached_results(run, key)
    if items is not None:
        return items
    if request.parallel > 1 and request.solver == "lissa" and start_parallel is not None:
        start_parallel(run, request)
        return None
    run.progress("loading", 0, 1)
    engine, cache = engine_and_cache(run, model)
    encoded, influences = engine.analyze(
        queries_of(request), k=request.k, solver=solver_config(request), group=request.group,
        cache=cache, on_progress=run.progress,
    )
    items = result_items(engine, encoded, influences, request.top)
    store_results(run, key, items)
    return items
