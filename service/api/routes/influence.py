"""Influence jobs: validate against the model, record the job, send it to an accelerator worker."""

from __future__ import annotations

from fastapi import APIRouter

from api_schemas import InfluenceRequest, Job
from records.celery_app import INFLUENCE

from ..deps import SettingsDep
from ..starting import ReadyModel, StartJob, start_inputs_job

router = APIRouter(prefix="/v1", tags=["influence"])


@router.post("/influence", status_code=202, response_model=Job)
def start_influence(body: InfluenceRequest, settings: SettingsDep, ready_model: ReadyModel, start_job: StartJob) -> Job:
    """Start an influence job; the same Idempotency-Key and body return the same job."""
    return start_inputs_job("influence", INFLUENCE, body, settings, ready_model, start_job)
