"""The quality job: how faithful a model's influence scores are (LDS per solver configuration).

Like the application jobs: the route checks the body against the model record (sizes,
labels, paths), records the job and sends its task by name; the report comes from
GET /v1/jobs/{id}/results and, once the job succeeds, on GET /v1/models/{id} (`quality`).
"""

from __future__ import annotations

import math

from fastapi import APIRouter

from api_schemas import Job, QualityJobRequest, QualityRequest
from api_schemas.quality import MIN_TRAIN_SAMPLE
from records.celery_app import QUALITY

from ...errors import ProblemError
from ...paths import resolve_in_root
from ..deps import SettingsDep
from ..starting import ReadyModel, StartJob, check_inputs, check_labels

router = APIRouter(prefix="/v1/models", tags=["quality"])


def _too_few(detail: str, field: str) -> ProblemError:
    return ProblemError("too-few-training-examples", detail,
                        errors=[{"loc": ["body", field], "msg": "too few training examples",
                                 "type": "too_few_training_examples"}])


def check_sizes(body: QualityRequest, num_train: int | None) -> None:
    """422 too-few-training-examples unless the training set allows the sample and the subsets asked for."""
    if num_train is None:
        return  # a ready model always has it; the worker checks again
    if num_train < MIN_TRAIN_SAMPLE:
        raise _too_few(f"the model has {num_train} training examples; the LDS needs at least {MIN_TRAIN_SAMPLE}",
                       "train_sample")
    sample = min(body.train_sample, num_train)
    size = max(1, round(body.fraction * sample))
    if size >= sample:
        raise _too_few(f"a fraction of {body.fraction} of {sample} training examples leaves no example out of a "
                       "subset: lower the fraction", "fraction")
    if math.comb(sample, size) < body.subsets:
        raise _too_few(f"{sample} training examples have only {math.comb(sample, size)} subsets of {size}; "
                       f"{body.subsets} were asked for", "subsets")


@router.post("/{model_id}/quality", status_code=202, response_model=Job)
def start_quality(model_id: str, body: QualityRequest, settings: SettingsDep, ready_model: ReadyModel,
                  start_job: StartJob) -> Job:
    """Measure the model's influence scores against retraining: the LDS of each solver configuration,
    retraining noise, kNN recall and solver agreement. The report also lands on the model record."""
    if body.held_out is not None:
        check_inputs(body.held_out, "held_out", settings, inline_set=True)
    model = ready_model(model_id)
    check_sizes(body, model.num_train)
    if body.held_out is not None:
        check_labels(body.held_out, "held_out", model)
    else:
        assert body.held_out_from is not None
        path = resolve_in_root(settings.data_root, body.held_out_from.path, "held_out_from.path")
        body = body.model_copy(update={"held_out_from": body.held_out_from.model_copy(update={"path": path})})
    job_request = QualityJobRequest.model_validate({**body.model_dump(mode="json"), "model_id": model.id})
    return start_job("quality", QUALITY, job_request, model)
