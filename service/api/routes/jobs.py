"""Jobs: read, list, page through results or stream them all as JSON Lines, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator, WithJsonSchema

from api_schemas import Job, JobList, JobStatus, ResultsPage

from ...errors import ProblemError
from ..deps import CallerDep, JobsDep, VisibleJob

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _blank_is(default: object) -> BeforeValidator:
    """An empty query value (`?status=&limit=`, as API.md writes them) means the default."""
    return BeforeValidator(lambda value: default if value == "" else value)


def _or_blank(schema: dict) -> WithJsonSchema:
    """The OpenAPI schema of a parameter that may also be empty (then it means its default)."""
    return WithJsonSchema({"anyOf": [schema, {"type": "string", "maxLength": 0}]})


StatusFilter = Annotated[JobStatus | None, _blank_is(None),
                         _or_blank({"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]})]
Offset = Annotated[int, Query(ge=0), _blank_is(0), _or_blank({"type": "integer", "minimum": 0})]
Limit = Annotated[int, Query(ge=1, le=1000), _blank_is(50), _or_blank({"type": "integer", "minimum": 1, "maximum": 1000})]


@router.get("", response_model=JobList)
def list_jobs(
    jobs: JobsDep,
    caller: CallerDep,
    status: StatusFilter = None,
    limit: Limit = 50,
) -> JobList:
    """Recent jobs, newest first, optionally only those in `status`; a client key sees only its own."""
    return JobList(items=jobs.list(status=status, limit=limit, owner=None if caller.is_admin else caller.name))


@router.get("/{job_id}", response_model=Job)
def get_job(job: VisibleJob) -> Job:
    """The job's status, progress, times and error."""
    return job


@router.get("/{job_id}/results", response_model=ResultsPage)
def get_results(
    job: VisibleJob,
    jobs: JobsDep,
    offset: Offset = 0,
    limit: Limit = 50,
) -> ResultsPage:
    """Result items [offset, offset+limit) in input order; 409 until the job has succeeded.

    A dataset job's (inputs_from) are readable in any status: while it runs, the items of its finished shards from
    the first up to the first still missing (a page once read never moves); once it is over, every finished shard's.
    """
    _require_results(job)
    total, items = jobs.results(job.id, offset, limit)
    return ResultsPage(job_id=job.id, offset=offset, limit=limit, total=total, items=items)


JSON_LINES = "application/jsonl"


def _require_results(job: Job) -> None:
    """409 job-not-finished unless the job has results to read: it succeeded, or it is a dataset job."""
    if job.status != "succeeded" and job.inputs_total is None:
        raise ProblemError("job-not-finished", f"job {job.id} is {job.status}; results exist once it succeeds")


@router.get("/{job_id}/results.jsonl", response_class=StreamingResponse, responses={200: {
    "description": "Every result item, one JSON object per line, in input order (the items of the results pages)",
    "content": {JSON_LINES: {"schema": {"type": "string"}}}}})
def stream_results(job: VisibleJob, jobs: JobsDep) -> StreamingResponse:
    """All result items as JSON Lines, streamed from Redis a chunk at a time; 409 until the job has succeeded.

    A dataset job's stream in any status: the items of the shards finished when it starts.
    """
    _require_results(job)
    lines = (item + "\n" for item in jobs.iter_raw_results(job.id))
    return StreamingResponse(lines, media_type=JSON_LINES, headers={
        "Content-Disposition": f'attachment; filename="{job.id}.results.jsonl"'})


@router.post("/{job_id}/cancel", response_model=Job)
def cancel_job(job: VisibleJob, jobs: JobsDep) -> Job:
    """Cancel a queued job now; flag a running one (it stops at its next check)."""
    return jobs.request_cancel(job.id)  # JobNotFound -> 404, JobNotCancellable -> 409
