"""Influence jobs: validate against the model, record the job, send it to an accelerator worker."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Response

from api_schemas import InfluenceRequest, Job, Model
from records.celery_app import INFLUENCE

from ...enqueue import send_job_task
from ...errors import ProblemError
from ..deps import CeleryDep, JobsDep, ModelsDep, SettingsDep

router = APIRouter(prefix="/v1", tags=["influence"])

# Visible ASCII only: the key becomes part of a Redis key name and of log lines.
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@router.post("/influence", status_code=202, response_model=Job)
def start_influence(
    body: InfluenceRequest,
    response: Response,
    settings: SettingsDep,
    models: ModelsDep,
    jobs: JobsDep,
    celery: CeleryDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Job:
    """Start an influence job; the same Idempotency-Key and body return the same job."""
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise ProblemError("invalid-request", "Idempotency-Key must be 1-255 visible ASCII characters",
                           errors=[{"loc": ["header", "Idempotency-Key"], "msg": "invalid", "type": "value_error"}])
    _check_limits(body, settings.max_inputs, settings.max_text_chars)
    model = models.get(body.model_id)
    if model is None:
        raise ProblemError("model-not-found", f"no model {body.model_id}")
    if model.status != "ready":
        raise ProblemError("model-not-ready", f"model {model.id} is {model.status}")
    _check_labels(body, model)
    job, created = jobs.create_or_replay(
        "influence", model.id, body.model_dump(mode="json"), idempotency_key, max_queued=settings.max_queued_jobs
    )
    if created:
        send_job_task(celery, jobs, INFLUENCE, [job.id], job.id)
        job = jobs.get(job.id) or job
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


def _check_limits(body: InfluenceRequest, max_inputs: int, max_chars: int) -> None:
    """413 when the request is larger than this service accepts."""
    if len(body.inputs) > max_inputs:
        raise ProblemError("too-many-inputs", f"{len(body.inputs)} inputs; at most {max_inputs} per request")
    for i, item in enumerate(body.inputs):
        for field in ("text", "text_pair"):
            value = getattr(item, field)
            if value is not None and len(value) > max_chars:
                raise ProblemError(
                    "text-too-long", f"inputs[{i}].{field} has {len(value)} characters; at most {max_chars}",
                    errors=[{"loc": ["body", "inputs", i, field], "msg": "too long", "type": "text_too_long"}],
                )


def _check_labels(body: InfluenceRequest, model: Model) -> None:
    """422 unknown-label unless every given label names, or indexes, one of the model's labels."""
    if model.labels is None:
        return
    for i, item in enumerate(body.inputs):
        label = item.label
        if label is None:
            continue
        known = label in model.labels if isinstance(label, str) else 0 <= label < len(model.labels)
        if not known:
            raise ProblemError(
                "unknown-label", f"inputs[{i}].label {label!r} is not one of {model.labels}",
                errors=[{"loc": ["body", "inputs", i, "label"], "msg": "unknown label", "type": "unknown_label"}],
            )
