"""FastIF's applications as jobs: explain, graph, correct, self-influence; the graph's and correction's pictures.

Each POST validates the body against the model, records the job and sends its task by
name, like POST /v1/influence; results come from GET /v1/jobs/{id}/results.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from api_schemas import CorrectRequest, EvaluationSet, ExplainRequest, GraphRequest, Job, Model, SelfInfluenceRequest
from records.celery_app import CORRECT, EXPLAIN, GRAPH, SELF_INFLUENCE
from records.settings import Settings

from ...enqueue import send_job_task
from ...errors import ProblemError
from ...paths import resolve_in_root
from ..deps import CeleryDep, JobsDep, ModelsDep, SettingsDep

router = APIRouter(prefix="/v1", tags=["applications"])

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def _ready_model(models: ModelsDep, model_id: str) -> Model:
    model = models.get(model_id)
    if model is None:
        raise ProblemError("model-not-found", f"no model {model_id}")
    if model.status != "ready":
        raise ProblemError("model-not-ready", f"model {model.id} is {model.status}")
    return model


def _check_inputs(items: list[Any], where: str, settings: Settings) -> None:
    """413 when there are more inputs, or longer texts, than this service accepts."""
    if len(items) > settings.max_inputs:
        raise ProblemError("too-many-inputs", f"{len(items)} {where}; at most {settings.max_inputs} per request")
    for i, item in enumerate(items):
        for field in ("text", "text_pair"):
            value = getattr(item, field)
            if value is not None and len(value) > settings.max_text_chars:
                raise ProblemError(
                    "text-too-long", f"{where}[{i}].{field} has {len(value)} characters; at most {settings.max_text_chars}",
                    errors=[{"loc": ["body", where, i, field], "msg": "too long", "type": "text_too_long"}],
                )


def _check_labels(items: list[Any], where: str, model: Model) -> None:
    """422 unknown-label unless every given label names, or indexes, one of the model's labels."""
    if model.labels is None:
        return
    for i, item in enumerate(items):
        label = item.label
        if label is None:
            continue
        known = label in model.labels if isinstance(label, str) else 0 <= label < len(model.labels)
        if not known:
            raise ProblemError(
                "unknown-label", f"{where}[{i}].label {label!r} is not one of {model.labels}",
                errors=[{"loc": ["body", where, i, "label"], "msg": "unknown label", "type": "unknown_label"}],
            )


def _start(kind: str, task: str, body: BaseModel, model: Model, response: Response, settings: Settings,
           jobs: JobsDep, celery: CeleryDep, idempotency_key: str | None) -> Job:
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise ProblemError("invalid-request", "Idempotency-Key must be 1-255 visible ASCII characters",
                           errors=[{"loc": ["header", "Idempotency-Key"], "msg": "invalid", "type": "value_error"}])
    job, created = jobs.create_or_replay(kind, model.id, body.model_dump(mode="json"), idempotency_key,
                                        max_queued=settings.max_queued_jobs)
    if created:
        send_job_task(celery, jobs, task, [job.id], job.id)
        job = jobs.get(job.id) or job
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.post("/explain", status_code=202, response_model=Job)
def start_explain(body: ExplainRequest, response: Response, settings: SettingsDep, models: ModelsDep, jobs: JobsDep,
                  celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> Job:
    """Explain each input by its most helpful and harmful training examples."""
    _check_inputs(body.inputs, "inputs", settings)
    model = _ready_model(models, body.model_id)
    _check_labels(body.inputs, "inputs", model)
    return _start("explain", EXPLAIN, body, model, response, settings, jobs, celery, idempotency_key)


@router.post("/graph", status_code=202, response_model=Job)
def start_graph(body: GraphRequest, response: Response, settings: SettingsDep, models: ModelsDep, jobs: JobsDep,
                celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> Job:
    """The influence graph of a set of inputs: JSON, PNG and SVG."""
    _check_inputs(body.inputs, "inputs", settings)
    model = _ready_model(models, body.model_id)
    _check_labels(body.inputs, "inputs", model)
    return _start("graph", GRAPH, body, model, response, settings, jobs, celery, idempotency_key)


@router.post("/correct", status_code=202, response_model=Job)
def start_correct(body: CorrectRequest, response: Response, settings: SettingsDep, models: ModelsDep, jobs: JobsDep,
                  celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> Job:
    """Correct the model round by round on failing anchors with its most helpful points, against harmful and random points."""
    model = _ready_model(models, body.model_id)
    updates: dict[str, Any] = {}
    if isinstance(body.anchors, list):
        _check_inputs(body.anchors, "anchors", _many(settings))
        _check_labels(body.anchors, "anchors", model)
    else:
        updates["anchors"] = _labelled_set(body.anchors, "anchors", settings, model)
    updates["evaluation"] = _labelled_set(body.evaluation, "evaluation", settings, model)
    pool = body.candidates.pool
    if pool is not None:
        if isinstance(pool, str):
            pool = resolve_in_root(settings.data_root, pool, "candidates.pool")
        else:
            pool = pool.model_copy(update={"path": resolve_in_root(settings.data_root, pool.path, "candidates.pool.path")})
        updates["candidates"] = body.candidates.model_copy(update={"pool": pool})
    body = body.model_copy(update=updates)
    return _start("correct", CORRECT, body, model, response, settings, jobs, celery, idempotency_key)


def _labelled_set(source: EvaluationSet, where: str, settings: Settings, model: Model) -> EvaluationSet:
    """Inline examples checked like inputs; a file resolved inside the data root and refused when empty."""
    if source.path is None:
        _check_inputs(source.examples or [], f"{where}.examples", _many(settings))
        _check_labels(source.examples or [], f"{where}.examples", model)
        return source
    path = resolve_in_root(settings.data_root, source.path, f"{where}.path")
    file = settings.data_root.resolve() / path
    if file.is_file() and not file.read_bytes()[:65536].strip():
        raise ProblemError("empty-data", f"{where}.path {source.path!r} holds no examples",
                           errors=[{"loc": ["body", where, "path"], "msg": "empty file", "type": "empty_data"}])
    return source.model_copy(update={"path": path})


def _many(settings: Settings) -> Settings:
    """Inline evaluation examples may number up to 100× the inputs limit (the body limit still applies)."""
    return settings.model_copy(update={"max_inputs": settings.max_inputs * 100})


@router.post("/self-influence", status_code=202, response_model=Job)
def start_self_influence(body: SelfInfluenceRequest, response: Response, settings: SettingsDep, models: ModelsDep,
                         jobs: JobsDep, celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> Job:
    """Self-influence of training examples, ranked most negative first (likely mislabels)."""
    model = _ready_model(models, body.model_id)
    if body.indices is not None and model.num_train is not None:
        bad = [i for i in body.indices if i >= model.num_train]
        if bad:
            raise ProblemError("invalid-request", f"indices {bad[:5]} are not below the training set's size {model.num_train}",
                               errors=[{"loc": ["body", "indices"], "msg": "out of range", "type": "value_error"}])
    return _start("self_influence", SELF_INFLUENCE, body, model, response, settings, jobs, celery, idempotency_key)


# -- the pictures of graph and correct jobs ----------------------------------------------------------
_MEDIA = {"png": "image/png", "svg": "image/svg+xml"}


def _picture(job_id: str, kind: str, fmt: str, jobs: JobsDep, settings: Settings) -> FileResponse:
    job = jobs.get(job_id)
    if job is None:
        raise ProblemError("job-not-found", f"no job {job_id}")
    if job.kind != kind:
        raise ProblemError("not-found", f"job {job_id} is a {job.kind} job; only {kind} jobs have this picture")
    if job.status != "succeeded":
        raise ProblemError("job-not-finished", f"job {job_id} is {job.status}; the picture exists once it succeeds")
    _, items = jobs.results(job_id, 0, 1)
    relative = (items[0].get("files") or {}).get(fmt) if items else None
    state = Path(settings.state_dir or settings.data_root / ".fastif").resolve()
    path = (state / relative).resolve() if isinstance(relative, str) else None
    if path is None or not path.is_relative_to(state) or not path.is_file():
        raise ProblemError("not-found", f"the {fmt.upper()} picture of job {job_id} is gone")
    # An SVG is a document: forbid scripts and outside loads if it is opened directly.
    headers = {"X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:"}
    return FileResponse(path, media_type=_MEDIA[fmt], headers=headers)


@router.get("/jobs/{job_id}/graph.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "The rendered graph"}})
def graph_png(job_id: str, jobs: JobsDep, settings: SettingsDep) -> FileResponse:
    """The graph job's picture as PNG."""
    return _picture(job_id, "graph", "png", jobs, settings)


@router.get("/jobs/{job_id}/graph.svg", response_class=FileResponse,
            responses={200: {"content": {"image/svg+xml": {}}, "description": "The rendered graph"}})
def graph_svg(job_id: str, jobs: JobsDep, settings: SettingsDep) -> FileResponse:
    """The graph job's picture as SVG."""
    return _picture(job_id, "graph", "svg", jobs, settings)


@router.get("/jobs/{job_id}/correction.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "Accuracy by round, per strategy"}})
def correction_png(job_id: str, jobs: JobsDep, settings: SettingsDep) -> FileResponse:
    """The correct job's plot: evaluation accuracy by round for each strategy (mean ± std over trials)."""
    return _picture(job_id, "correct", "png", jobs, settings)
