"""The job resource: one asynchronous piece of work and where it stands."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .common import ErrorInfo, ResponseModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class Progress(ResponseModel):
    """How far the job is: `done` of `total` units of the current `stage`."""

    stage: str | None = None
    done: int = 0
    total: int | None = None


class Job(ResponseModel):
    """GET /v1/jobs/{job_id}."""

    id: str
    kind: str
    status: JobStatus
    progress: Progress = Field(default_factory=Progress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorInfo | None = None
    model_id: str | None = None
    request_hash: str
    result_count: int | None = None
    deliveries: int = 0
    cancel_requested: bool = False
    # The name of the API key that created the job (never the key); null when the service runs without keys.
    owner: str | None = None
    # A dataset job's (inputs_from) count of inputs; its results are readable shard by shard while it runs (the
    # finished shards from the first up to the first missing), and `result_count` counts every finished shard's
    # inputs. Null for every other job.
    inputs_total: int | None = None


class JobList(ResponseModel):
    """GET /v1/jobs: newest first."""

    items: list[Job]
