"""Send a Celery task by name for a job that is already recorded, or fail the job.

A job must never stay `queued` with no message behind it: when the send fails the job
is marked failed and the client gets a 503.
"""

from __future__ import annotations

import logging

import redis
from celery import Celery
from celery.exceptions import OperationalError

from records.jobs import JobStore

from .errors import ProblemError

log = logging.getLogger("fastif.service")

_BROKER_DOWN = (OperationalError, redis.RedisError, OSError)


def send_job_task(celery: Celery, jobs: JobStore, task_name: str, args: list[str], job_id: str) -> None:
    """Publish `task_name(*args)` with the job id as the Celery task id; 503 if the broker is down."""
    try:
        # ignore_result: send_task does not apply task_ignore_result (it cannot see the task),
        # and without it the API would subscribe to a result channel for every job it sends.
        celery.send_task(task_name, args=args, task_id=job_id, ignore_result=True)
    except Exception as exc:
        code = "redis-unavailable" if isinstance(exc, _BROKER_DOWN) else "enqueue-failed"
        try:
            jobs.fail(job_id, code, f"could not enqueue {task_name}: {exc}")
            # The client will retry with the same Idempotency-Key: that must start the job, not replay this failure.
            jobs.release_idempotency_key(job_id)
        except redis.RedisError:
            # Redis is down for the record too; the job stays queued with no message.
            log.error("job %s could not be enqueued nor marked failed", job_id)
        if code == "enqueue-failed":
            raise
        log.warning("could not enqueue %s for job %s: %s", task_name, job_id, exc)
        raise ProblemError("redis-unavailable", "the job queue is unavailable; the job was not started",
                           headers={"Retry-After": "5"}) from exc
