"""FastIF's applications as jobs: explain, graph, correct, self-influence; the graph's and correction's pictures.

Each POST validates the body against the model and starts its job the way every job route
does (service/api/starting.py: recorded, its task sent by name); results come from
GET /v1/jobs/{id}/results.
"""

from __future__ import annotations

from typing import Any
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api_schemas import CorrectRequest, EvaluationSet, ExplainRequest, GraphRequest, Job, Model, SelfInfluenceRequest
from records.celery_app import CORRECT, EXPLAIN, GRAPH, SELF_INFLUENCE
from records.paths import OutsideRoot, resolve_inside
from records.settings import Settings

from ...errors import ProblemError
from ...paths import resolve_in_root
from ..deps import CallerDep, JobsDep, SettingsDep, VisibleJob
from ..starting import (ReadyModel, StartJob, check_inputs, check_labels, checked_inputs_file, not_over_inputs,
                        start_inputs_job, with_output_path)

router = APIRouter(prefix="/v1", tags=["applications"])


@router.post("/explain", status_code=202, response_model=Job)
def start_explain(body: ExplainRequest, settings: SettingsDep, ready_model: ReadyModel, start_job: StartJob) -> Job:
    """Explain each input by its most helpful and harmful training examples."""
    return start_inputs_job("explain", EXPLAIN, body, settings, ready_model, start_job)


@router.post("/graph", status_code=202, response_model=Job)
def start_graph(body: GraphRequest, settings: SettingsDep, ready_model: ReadyModel, start_job: StartJob) -> Job:
    """The influence graph of a set of inputs: JSON, PNG and SVG."""
    return start_inputs_job("graph", GRAPH, body, settings, ready_model, start_job)


@router.post("/correct", status_code=202, response_model=Job)
def start_correct(body: CorrectRequest, settings: SettingsDep, ready_model: ReadyModel, start_job: StartJob,
                  caller: CallerDep) -> Job:
    """Correct the model round by round on failing anchors with its most helpful points, against harmful and random points.

    `save_as` registers the corrected model, so it needs an admin key, as registering does.
    """
    if body.save_as is not None and not caller.is_admin:
        raise ProblemError("forbidden", f"save_as registers a model; the API key {caller.name!r} is a client key")
    model = ready_model(body.model_id)
    updates: dict[str, Any] = {}
    if isinstance(body.anchors, list):
        check_inputs(body.anchors, "anchors", settings, inline_set=True)
        check_labels(body.anchors, "anchors", model)
    else:
        updates["anchors"] = _labelled_set(body.anchors, "anchors", settings, model)
    updates["evaluation"] = _labelled_set(body.evaluation, "evaluation", settings, model)
    if body.control is not None:
        updates["control"] = _labelled_set(body.control, "control", settings, model)
    pool = body.candidates.pool
    if pool is not None:
        if isinstance(pool, str):
            pool = resolve_in_root(settings.data_root, pool, "candidates.pool")
        else:
            pool = pool.model_copy(update={"path": resolve_in_root(settings.data_root, pool.path, "candidates.pool.path")})
        updates["candidates"] = body.candidates.model_copy(update={"pool": pool})
    body = body.model_copy(update=updates)
    return start_job("correct", CORRECT, body, model)


def _has_content(file: Path) -> bool:
    """Anything but whitespace in the file's first 64 KiB (a blank file has no examples)."""
    with file.open("rb") as handle:
        return bool(handle.read(65536).strip())


def _labelled_set(source: EvaluationSet, where: str, settings: Settings, model: Model) -> EvaluationSet:
    """Inline examples checked like inputs; a file resolved inside the data root and refused when empty."""
    if source.path is None:
        check_inputs(source.examples or [], f"{where}.examples", settings, inline_set=True)
        check_labels(source.examples or [], f"{where}.examples", model)
        return source
    path = resolve_in_root(settings.data_root, source.path, f"{where}.path")
    file = settings.data_root.resolve() / path
    if file.is_file() and not _has_content(file):
        raise ProblemError("empty-data", f"{where}.path {source.path!r} holds no examples",
                           errors=[{"loc": ["body", where, "path"], "msg": "empty file", "type": "empty_data"}])
    return source.model_copy(update={"path": path})


@router.post("/self-influence", status_code=202, response_model=Job)
def start_self_influence(body: SelfInfluenceRequest, settings: SettingsDep, ready_model: ReadyModel,
                         start_job: StartJob) -> Job:
    """Self-influence of training examples, ranked most negative first (likely mislabels), or of a file's examples."""
    body = with_output_path(body, settings)
    model = ready_model(body.model_id)
    if body.inputs_from is not None:
        checked, count = checked_inputs_file(body.inputs_from, settings, model)
        return start_job("self_influence", SELF_INFLUENCE, not_over_inputs(body.model_copy(update={"inputs_from": checked})),
                         model, inputs_total=count)
    if body.indices is not None and model.num_train is not None:
        bad = [i for i in body.indices if i >= model.num_train]
        if bad:
            raise ProblemError("invalid-request", f"indices {bad[:5]} are not below the training set's size {model.num_train}",
                               errors=[{"loc": ["body", "indices"], "msg": "out of range", "type": "value_error"}])
    return start_job("self_influence", SELF_INFLUENCE, body, model)


# -- the pictures of graph and correct jobs ----------------------------------------------------------
_MEDIA = {"png": "image/png", "svg": "image/svg+xml"}


def _picture(job: Job, kind: str, fmt: str, jobs: JobsDep, settings: Settings) -> FileResponse:
    job_id = job.id
    if job.kind != kind:
        raise ProblemError("not-found", f"job {job_id} is a {job.kind} job; only {kind} jobs have this picture")
    if job.status != "succeeded":
        raise ProblemError("job-not-finished", f"job {job_id} is {job.status}; the picture exists once it succeeds")
    _, items = jobs.results(job_id, 0, 1)
    relative = (items[0].get("files") or {}).get(fmt) if items else None
    try:
        # The worker wrote the picture under the state directory; the result names it relative to that.
        path = resolve_inside(settings.state_root, relative) if isinstance(relative, str) else None
    except OutsideRoot:
        path = None
    if path is None or not path.is_file():
        raise ProblemError("not-found", f"the {fmt.upper()} picture of job {job_id} is gone")
    # An SVG is a document: forbid scripts and outside loads if it is opened directly.
    headers = {"X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:"}
    return FileResponse(path, media_type=_MEDIA[fmt], headers=headers)


@router.get("/jobs/{job_id}/graph.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "The rendered graph"}})
def graph_png(job: VisibleJob, jobs: JobsDep, settings: SettingsDep) -> FileResponse:
    """The graph job's picture as PNG."""
    return _picture(job, "graph", "png", jobs, settings)


@router.get("/jobs/{job_id}/graph.svg", response_class=FileResponse,
            responses={200: {"content": {"image/svg+xml": {}}, "description": "The rendered graph"}})
def graph_svg(job: VisibleJob, jobs: JobsDep, settings: SettingsDep) -> FileResponse:
    """The graph job's picture as SVG."""
    return _picture(job, "graph", "svg", jobs, settings)


@router.get("/jobs/{job_id}/correction.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "Accuracy by round, per strategy"}})
def correction_png(job: VisibleJob, jobs: JobsDep, settings: SettingsDep) -> FileResponse:
    """The correct job's plot: evaluation accuracy by round for each strategy (mean ± std over trials)."""
    return _picture(job, "correct", "png", jobs, settings)
