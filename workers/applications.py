"""The work of FastIF's application jobs: explain, graph, correct, self-influence.

Each ``run_*`` takes the JobRun that ``run_job`` gives and returns the result items.
Explanations are cached in Redis like influence results; every job reuses the cached
per-test gradients and s_test while the model is as registered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from api_schemas import (
    CorrectionReport,
    CorrectRequest,
    DataRef,
    ExplainItem,
    ExplainRequest,
    GraphRequest,
    Model,
    ModelCreate,
    SelfInfluenceRequest,
)
from fastif import Example, InfluenceEngine, Query
from fastif.applications import (
    correct,
    influence_graph,
    rank_self_influence,
    render,
    render_rounds,
    save_corrected,
)
from records.celery_app import BUILD_MODEL
from records.keys import job as job_key

from .configs import correction_config, inputs_as_queries, solver_config
from .data_files import load
from .registry import engine_and_cache, ready_model
from .result_cache import cached_results, result_cache_key, store_results
from .results import explain_items, stored_items
from .dataset import SendTask as DatasetSend
from .dataset import start_dataset
from .runner import HandedOn, Items, JobFailed, JobRun
from .tensor_cache import RedisTensorCache

ROUND_CACHE_TTL_S = 3600  # a correct job's per-round s_test entries (fastif/applications/correction)

SendTask = Callable[[str, list, str], None]
"""``send(task_name, args, task_id)``: publish a task (the Celery app's send_task)."""


# -- explain -------------------------------------------------------------------------------------
def run_explain(run: JobRun, send: DatasetSend) -> Items | HandedOn:
    request = ExplainRequest.model_validate(run.request)
    if request.inputs_from is not None:  # a dataset job: its shards finish it
        return start_dataset(run, request.model_id, request.inputs_from, send)
    model = ready_model(run, request.model_id)
    key = result_cache_key(model, request, "explain")
    cached = cached_results(run, key)
    if cached is not None:
        return cached
    run.progress("loading", 0, 1)
    engine, cache = engine_and_cache(run, model)
    # Each input is explained on its own (no grouping), with respect to its given label, else the predicted one.
    encoded, influences = engine.analyze(inputs_as_queries(request.inputs), k=request.k, solver=solver_config(request),
                                         group=False, cache=cache, on_progress=run.progress)
    items = explain_items(engine, encoded, influences, request.top)
    store_results(run, key, stored_items(ExplainItem, items))
    return items


# -- graph ---------------------------------------------------------------------------------------
def graph_files(job_id: str) -> dict[str, str]:
    """Where a graph job's pictures live, relative to the state dir."""
    return {"png": f"graphs/{job_id}.png", "svg": f"graphs/{job_id}.svg"}


def run_graph(run: JobRun) -> Items:
    request = GraphRequest.model_validate(run.request)
    model = ready_model(run, request.model_id)
    run.progress("loading", 0, 1)
    engine, cache = engine_and_cache(run, model)
    graph = influence_graph(engine, inputs_as_queries(request.inputs), [i.group for i in request.inputs], k=request.k,
                            top=request.top, threshold=request.threshold, solver=solver_config(request), cache=cache,
                            on_progress=run.progress)
    run.progress("rendering", 0, 1)
    files = graph_files(run.job_id)
    state = run.ctx.settings.state_root
    render(graph, png_path=state / files["png"], svg_path=state / files["svg"],
           title=f"{model.name}: influence of training examples on {len(request.inputs)} input(s)")
    graph["files"] = files
    graph["images"] = {fmt: f"/v1/jobs/{run.job_id}/graph.{fmt}" for fmt in files}
    return [graph]


# -- correct -------------------------------------------------------------------------------------
def _labelled(run: JobRun, engine: InfluenceEngine, model: Model, source) -> list[Example]:
    """Inline labelled inputs (label names or ids) or the examples of a file, as label ids."""
    inline = source if isinstance(source, list) else source.examples
    if inline is not None:
        encoded = engine.encode(inputs_as_queries(inline))  # resolves the labels (names or ids)
        return [Example(e.text, e.text_pair, label) for e, label in zip(inline, encoded.labels_used)]
    return load(run, engine, model, source.data_ref())


def _register_corrected(run: JobRun, model: Model, name: str, folder: Path, send: SendTask) -> dict:
    """A model record for the saved folder (same training data and settings) and its build job."""
    relative = folder.resolve().relative_to(run.ctx.settings.data_root.resolve()).as_posix()
    create = ModelCreate(name=name, model_path=relative, train_data=model.request.train_data,
                         influence=model.request.influence, index=model.request.index)
    new = run.ctx.models.create(create)
    owner = run.ctx.jobs.require(run.job_id).owner  # the build is the correct job's owner's, as if they registered it
    build = run.ctx.jobs.create("build_model", new.id, create.model_dump(mode="json"), owner=owner)
    run.ctx.models.set_build_job(new.id, build.id)
    send(BUILD_MODEL, [new.id], build.id)
    return {"model_id": new.id, "name": name, "model_path": relative, "build_job_id": build.id}


def correction_files(job_id: str) -> dict[str, str]:
    """Where a correct job's plot lives, relative to the state dir."""
    return {"png": f"corrections/{job_id}.png"}


def run_correct(run: JobRun, send: SendTask) -> Items:
    request = CorrectRequest.model_validate(run.request)
    model = ready_model(run, request.model_id)
    run.progress("loading", 0, 1)
    engine, cache = engine_and_cache(run, model)
    pool = None
    if request.candidates.pool is not None:
        ref = request.candidates.pool
        pool = load(run, engine, model, DataRef(path=ref) if isinstance(ref, str) else ref)
    anchors = [Query(e.text, e.text_pair, e.label) for e in _labelled(run, engine, model, request.anchors)]
    evaluation = _labelled(run, engine, model, request.evaluation)
    control = _labelled(run, engine, model, request.control) if request.control is not None else None
    try:
        config = correction_config(request)
        # The updated models' s_test is only worth keeping while a redelivered job could reuse it.
        round_cache = RedisTensorCache(run.ctx.redis_bytes, cache.model_fp, min(run.ctx.settings.cache_ttl_s, ROUND_CACHE_TTL_S),
                                       cache.max_bytes)
        outcome = correct(engine, anchors, evaluation, config=config, solver=solver_config(request), pool=pool,
                          control=control, cache=cache, round_cache=round_cache, on_progress=run.progress)
    except ValueError as err:  # a pool or file with too few anchors, an empty evaluation file, params below the prefix
        raise JobFailed("invalid-request", str(err)) from err
    report = outcome.report
    files = correction_files(run.job_id)
    render_rounds(report, run.ctx.settings.state_root / files["png"],
                  title=f"{model.name}: accuracy by round, {request.trials} trial(s), mean ± std")
    report.update(files=files, plot=f"/v1/jobs/{run.job_id}/correction.png", saved_model=None)
    if request.save_as is not None:
        report["saved_model"] = _save(run, engine, model, request, outcome, send)
    # Every field of the contract written out, defaults too, as correction reports have always been stored
    # (runner.finish then checks the item like any other).
    return [CorrectionReport.model_validate(report).model_dump(mode="json")]


def _save(run: JobRun, engine: InfluenceEngine, model: Model, request: CorrectRequest, outcome, send) -> dict:
    # A redelivered job must not register the corrected model twice.
    previous = run.ctx.redis.hget(job_key(run.job_id), "saved_model")
    if previous:
        return json.loads(previous)
    run.progress("saving", 0, 1)
    folder = run.ctx.settings.data_root / "corrected" / f"{request.save_as}-{run.job_id[:8]}"
    save_corrected(engine, outcome, "helpful", folder)
    saved = _register_corrected(run, model, request.save_as, folder, send)
    run.ctx.jobs.hset(run.job_id, {"saved_model": json.dumps(saved)})
    return saved


# -- self-influence ------------------------------------------------------------------------------
def run_self_influence(run: JobRun, send: DatasetSend) -> Items | HandedOn:
    request = SelfInfluenceRequest.model_validate(run.request)
    if request.inputs_from is not None:  # a dataset job: its shards finish it
        return start_dataset(run, request.model_id, request.inputs_from, send)
    model = ready_model(run, request.model_id)
    run.progress("loading", 0, 1)
    engine, _ = engine_and_cache(run, model)
    if request.indices is not None:
        bad = [i for i in request.indices if i >= engine.num_train]
        if bad:
            raise JobFailed("invalid-request", f"indices {bad[:5]} are not below the training set's size {engine.num_train}")
        indices = sorted(set(request.indices))
    elif request.sample is not None and request.sample < engine.num_train:
        rng = np.random.default_rng(request.seed)
        indices = sorted(int(i) for i in rng.choice(engine.num_train, size=request.sample, replace=False))
    else:
        indices = None
    items = rank_self_influence(engine, indices, solver=solver_config(request), chunk=request.chunk,
                                on_progress=run.progress)
    return items[: request.top] if request.top else items
