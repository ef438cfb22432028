"""Model registration: record the model, then let a CPU worker build its features and index."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api_schemas import Model, ModelCreate, ModelList
from records.celery_app import BUILD_MODEL
from records.errors import JobNotCancellable, JobNotFound, QueueFull

from ...enqueue import send_job_task
from ...paths import resolve_in_root
from ...storage import check_room
from ..deps import AdminOnly, CallerDep, CeleryDep, JobsDep, ModelsDep, SettingsDep

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=202, response_model=Model, dependencies=[AdminOnly], responses={
    507: {"description": "The state volume has less free space than the build needs (insufficient-storage); "
                         "nothing is recorded"}})
def register_model(body: ModelCreate, response: Response, settings: SettingsDep, models: ModelsDep,
                   jobs: JobsDep, celery: CeleryDep, caller: CallerDep) -> Model:
    """Register a model and its training data (paths inside the data root); starts the build. Admin keys only."""
    # Store paths relative to the root so workers resolve them against their own mount.
    model_path = resolve_in_root(settings.data_root, body.model_path, "model_path")
    train_path = resolve_in_root(settings.data_root, body.train_data.path, "train_data.path")
    request = body.model_copy(update={
        "model_path": model_path,
        "train_data": body.train_data.model_copy(update={"path": train_path}),
    })
    check_room(settings.data_root, settings.state_root, request)  # 507 before anything is recorded
    model = models.create(request)
    try:
        job = jobs.create("build_model", model.id, request.model_dump(mode="json"), owner=caller.name,
                          max_queued=settings.max_queued_jobs)
    except QueueFull:
        models.delete(model.id)
        raise
    models.set_build_job(model.id, job.id)
    try:
        send_job_task(celery, jobs, BUILD_MODEL, [model.id], job.id)
    except Exception:
        models.set_failed(model.id, "redis-unavailable", "the build could not be enqueued")
        raise
    response.headers["Location"] = f"/v1/models/{model.id}"
    return model.model_copy(update={"build_job_id": job.id})


@router.get("", response_model=ModelList)
def list_models(models: ModelsDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ModelList:
    """Registered models, newest first."""
    return ModelList(items=models.list(limit))


@router.get("/{model_id}", response_model=Model)
def get_model(model_id: str, models: ModelsDep) -> Model:
    """One model and the state of its build."""
    return models.require(model_id)  # ModelNotFound -> 404 model-not-found


@router.delete("/{model_id}", status_code=204, response_class=Response, dependencies=[AdminOnly])
def delete_model(model_id: str, models: ModelsDep, jobs: JobsDep) -> Response:
    """Forget the model and its Redis caches; a build in progress is cancelled. Admin keys only."""
    model = models.require(model_id)
    if model.status == "building" and model.build_job_id:
        try:
            jobs.request_cancel(model.build_job_id)
        except (JobNotCancellable, JobNotFound):
            pass  # already over: nothing to stop
    models.delete(model_id)
    return Response(status_code=204)
