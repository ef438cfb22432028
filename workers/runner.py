"""The life of a job on a worker: delivery count, progress, cancellation, outcome.

Every task goes through ``run_job`` so that each job kind fails, cancels and
reports progress the same way, and a job is never left ``running`` by an error.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fastif import CancelledError, FastIFError
from records.jobs import JobStore
from records.paths import OutsideRoot, resolve_inside

from .context import WorkerContext, context

log = logging.getLogger("fastif.workers")

# How long a worker holds on through a Redis outage: to store a finished job's outcome, or
# before handing a task back to Celery for a retry (which must publish to Redis).
REDIS_WAIT_S = 600.0


def wait_for_redis(client: redis.Redis, limit_s: float = REDIS_WAIT_S) -> bool:
    """Block until Redis answers PING again, at most ``limit_s``; True if it did."""
    deadline = time.monotonic() + limit_s
    delay = 0.2
    while True:
        try:
            if client.ping():
                return True
        except redis.RedisError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 5.0)


def through_outage(write: Callable[[], Any], client: redis.Redis, limit_s: float = REDIS_WAIT_S) -> Any:
    """``write()``, waiting out a Redis outage of up to ``limit_s`` instead of losing the outcome."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return write()
        except redis.RedisError as err:
            log.warning("redis unavailable (%s); waiting for it to store the job's outcome", err)
            if not wait_for_redis(client, deadline - time.monotonic()):
                raise


class JobFailed(Exception):
    """A job that cannot finish, with the code and message for its record."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def write_output(run: JobRun, items: list[dict]) -> None:
    """The items as JSON Lines in the request's `output_path` (in the data root), when it names one.

    Written beside the target and renamed over it, so that the file is complete or absent; a full
    volume raises OSError (the job then fails with insufficient-storage, see unexpected_failure).
    """
    raw = run.request.get("output_path")
    if not raw:
        return
    try:
        path = resolve_inside(run.ctx.settings.data_root, raw)  # again: the folder may have changed since the API looked
    except OutsideRoot:
        raise JobFailed("path-outside-data-root", f"output_path {raw!r} is not inside the data root") from None
    partial = path.with_name(f"{path.name}.{run.job_id}.part")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for item in items:
                out.write(json.dumps(item, ensure_ascii=False, allow_nan=False) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class ProgressReporter:
    """The engine's progress callback: throttled writes to the job record, cancel checks.

    Writing every LiSSA step would cost a Redis round trip per step; twice a second is
    enough for a client that polls and keeps cancellation prompt.
    """

    def __init__(self, jobs: JobStore, job_id: str, interval_s: float = 0.5):
        self.jobs = jobs
        self.job_id = job_id
        self.interval_s = interval_s
        self._last = 0.0
        self.cancelled = False

    def __call__(self, stage: str, done: int, total: int) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval_s or done == total:
            self._last = now
            try:
                self.jobs.set_progress(self.job_id, stage, done, total)
                self.cancelled = self.cancelled or self.jobs.cancel_requested(self.job_id)
            except redis.RedisError as err:
                # Progress is best effort: the computation goes on through a Redis outage,
                # and its outcome is stored once Redis is back (through_outage).
                log.warning("job %s: progress not recorded, redis unavailable: %s", self.job_id, err)
        return self.cancelled


@dataclass
class JobRun:
    job_id: str
    request: dict[str, Any]
    deliveries: int
    ctx: WorkerContext
    progress: ProgressReporter


def run_job(
    job_id: str,
    work: Callable[[JobRun], list[dict] | None],
    on_failure: Callable[[str, str], None] | None = None,
) -> str:
    """Run ``work`` for the job and record how it ended; returns the final status.

    ``work`` returns the result items (stored with the success), or None when it
    has handed the job on (a parallel job's shards finish it).

    When Redis goes away, the error goes back to the task's autoretry, which publishes
    the retry to Redis: so first wait for Redis to answer again. Without that wait the
    retry could not be published, Celery rejected the message, and the job stayed
    `running` for good.
    """
    try:
        return _run_job(job_id, work, on_failure)
    except redis.RedisError:
        wait_for_redis(context().redis)
        raise


def _run_job(
    job_id: str,
    work: Callable[[JobRun], list[dict] | None],
    on_failure: Callable[[str, str], None] | None,
) -> str:
    ctx = context()
    jobs = ctx.jobs
    deliveries = jobs.start_delivery(job_id)
    if deliveries == 0:
        return "skipped"  # gone, finished or cancelled while queued
    if deliveries > ctx.settings.max_deliveries:
        message = (f"the job was started {deliveries - 1} times and its worker died each time "
                   f"(limit {ctx.settings.max_deliveries}); giving up")
        return _fail(jobs, job_id, "redelivery-limit", message, on_failure)
    run = JobRun(job_id, jobs.request(job_id), deliveries, ctx, ProgressReporter(jobs, job_id))
    try:
        items = work(run)
        if items is not None:
            write_output(run, items)
    except CancelledError:
        through_outage(lambda: jobs.mark_cancelled(job_id), jobs.redis)
        return "cancelled"
    except JobFailed as err:
        return _fail(jobs, job_id, err.code, str(err), on_failure)
    except FastIFError as err:
        return _fail(jobs, job_id, err.code, str(err), on_failure)
    except redis.RedisError:
        raise  # Redis itself is gone: let the task's retry bring the job back
    except Exception as err:  # a full disk, a bug or an unexpected input: say so on the record, keep the worker
        log.exception("job %s failed", job_id)
        return _fail(jobs, job_id, *unexpected_failure(err), on_failure)
    if items is None:
        return "handed-on"
    # Hours of computation must not be thrown away by a Redis restart at the last moment.
    through_outage(lambda: jobs.succeed(job_id, items), jobs.redis)
    return "succeeded"


def unexpected_failure(err: Exception) -> tuple[str, str]:
    """The error code and message a job fails with on an exception nobody raised on purpose.

    A full state volume gets a code of its own (the operator frees space; the request was fine);
    anything else is an internal error.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {err.filename}" if err.filename else ""
        return "insufficient-storage", f"no space left on the state volume{where}; free some and submit again"
    return "internal-error", f"{type(err).__name__}: {err}"


def _fail(jobs: JobStore, job_id: str, code: str, message: str, on_failure) -> str:
    through_outage(lambda: jobs.fail(job_id, code, message), jobs.redis)
    if on_failure is not None:
        through_outage(lambda: on_failure(code, message), jobs.redis)
    return "failed"
