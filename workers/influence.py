"""The influence job: FastIF's query for each input (or the group), cached in Redis."""

from __future__ import annotations

from api_schemas import InfluenceRequest, ResultItem

from . import parallel
from .configs import queries_of, solver_config
from .dataset import start_dataset
from .registry import engine_and_cache, ready_model
from .result_cache import cached_results, result_cache_key, store_results
from .results import influence_items, stored_items
from .runner import HandedOn, Items, JobRun


def run_influence(run: JobRun, send: parallel.SendTask) -> Items | HandedOn:
    """One worker does it all, or hands it to shard tasks sent with ``send``: a dataset job's (``inputs_from``,
    workers/dataset.py) or, with ``parallel`` > 1 and LiSSA, the parallel variant's (workers/parallel.py)."""
    request = InfluenceRequest.model_validate(run.request)
    if request.inputs_from is not None:
        return start_dataset(run, request.model_id, request.inputs_from, send)
    model = ready_model(run, request.model_id)
    key = result_cache_key(model, request)
    cached = cached_results(run, key)
    if cached is not None:
        return cached
    if request.parallel > 1 and request.solver == "lissa":
        return parallel.start_parallel(run, request, send)
    run.progress("loading", 0, 1)
    engine, cache = engine_and_cache(run, model)
    encoded, influences = engine.analyze(
        queries_of(request), k=request.k, solver=solver_config(request), group=request.group,
        cache=cache, on_progress=run.progress,
    )
    items = influence_items(engine, encoded, influences, request.top)
    store_results(run, key, stored_items(ResultItem, items))
    return items
