"""The life of a job on a worker: delivery count, progress, cancellation, outcome.

Every task goes through ``run_job`` (a whole job) or ``run_step`` (a parallel job's shard)
so that each job kind fails, cancels and reports progress the same way, and a job is never
left ``running`` by an error; every job that succeeds is stored by ``finish``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel

from fastif import CancelledError, FastIFError
from records.jobs import JobStore
from records.paths import OutsideRoot, resolve_inside

from .context import WorkerContext, context
from .results import stored_items

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


def write_output(run: JobRun, lines: Iterable[str]) -> None:
    """The items (each one JSON text in ``lines``) as JSON Lines in the request's `output_path` (in the data root),
    when it names one.

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
            for line in lines:
                out.write(line + "\n")
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

    def cancel_check(self, _stage: str, _done: int, _total: int) -> bool:
        """A progress callback that only looks for a cancel (throttled the same way), for a shard whose own counts
        would mislead: its job reports the counts over all shards."""
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            try:
                self.cancelled = self.cancelled or self.jobs.cancel_requested(self.job_id)
            except redis.RedisError as err:
                log.warning("job %s: cancel not checked, redis unavailable: %s", self.job_id, err)
        return self.cancelled


@dataclass
class JobRun:
    job_id: str
    request: dict[str, Any]
    deliveries: int
    ctx: WorkerContext
    progress: ProgressReporter


class HandedOn:
    """What a job's work returns when other tasks finish the job (a parallel influence job's shards)."""

    def __repr__(self) -> str:
        return "HANDED_ON"


HANDED_ON = HandedOn()

Items = Sequence[BaseModel | dict[str, Any]]
Work = Callable[[JobRun], "Items | HandedOn"]
OnFailure = Callable[[str, str], None]


def run_job(job_id: str, work: Work, item_model: type[BaseModel] | None = None,
            on_failure: OnFailure | None = None) -> str:
    """Run ``work`` for the job and record how it ended; returns the final status.

    ``work`` returns the result items, which ``finish`` stores as ``item_model``s, or HANDED_ON
    when other tasks will finish the job (``"handed-on"``). Every task passes its job kind's model
    (workers/results.py ITEM_MODELS); None stores the items as given (stand-in work in tests).
    """
    ctx = context()
    with waiting_out_redis(ctx.redis):
        jobs = ctx.jobs
        deliveries = jobs.start_delivery(job_id)
        if deliveries == 0:
            return "skipped"  # gone, finished or cancelled while queued
        if deliveries > ctx.settings.max_deliveries:
            message = (f"the job was started {deliveries - 1} times and its worker died each time "
                       f"(limit {ctx.settings.max_deliveries}); giving up")
            return fail_job(jobs, job_id, "redelivery-limit", message, on_failure)
        run = JobRun(job_id, jobs.request(job_id), deliveries, ctx, ProgressReporter(jobs, job_id))

        def step() -> str:
            outcome = work(run)
            return "handed-on" if isinstance(outcome, HandedOn) else finish(run, outcome, item_model)

        return run_step(run, step, on_failure)


@contextmanager
def waiting_out_redis(client: redis.Redis) -> Iterator[None]:
    """A Redis error leaves a task only once Redis answers again.

    It goes back to the task's autoretry, which publishes the retry to Redis; without the wait
    the retry could not be published, Celery rejected the message, and the job stayed
    `running` for good.
    """
    try:
        yield
    except redis.RedisError:
        wait_for_redis(client)
        raise


def run_step(run: JobRun, step: Callable[[], str], on_failure: OnFailure | None = None, part: str = "") -> str:
    """Run one task's part of a job and return its status; an error ends the job, recorded as every job's is.

    Cancellation, a JobFailed or engine error, and anything unexpected each end the job on its
    record (through a Redis outage); a Redis error goes on to the task's retry. ``part`` (a
    shard) prefixes the message of an unexpected failure.
    """
    jobs = run.ctx.jobs
    try:
        return step()
    except CancelledError:
        through_outage(lambda: jobs.mark_cancelled(run.job_id), jobs.redis)
        return "cancelled"
    except (JobFailed, FastIFError) as err:
        return fail_job(jobs, run.job_id, err.code, str(err), on_failure)
    except redis.RedisError:
        raise  # Redis itself is gone: let the task's retry bring the job back
    except Exception as err:  # a full disk, a bug or an unexpected input: say so on the record, keep the worker
        log.exception("job %s failed %s", run.job_id, part)
        code, message = unexpected_failure(err)
        return fail_job(jobs, run.job_id, code, f"{part}: {message}" if part else message, on_failure)


def finish(run: JobRun, items: Items, item_model: type[BaseModel] | None) -> str:
    """Store the job's result items and mark it succeeded: how every job that ends well ends.

    Each item is checked against its contract model first (workers/results.py), so a drift fails
    the job instead of reaching a client; then the items go to `output_path`, if the request names
    one, and to the job record.
    """
    stored = list(items) if item_model is None else stored_items(item_model, items)
    write_output(run, (json.dumps(item, ensure_ascii=False, allow_nan=False) for item in stored))
    # Hours of computation must not be thrown away by a Redis restart at the last moment.
    through_outage(lambda: run.ctx.jobs.succeed(run.job_id, stored), run.ctx.jobs.redis)
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


def fail_job(jobs: JobStore, job_id: str, code: str, message: str, on_failure: OnFailure | None = None) -> str:
    """End the job as failed (through a Redis outage), and tell ``on_failure`` (a build fails its model too)."""
    through_outage(lambda: jobs.fail(job_id, code, message), jobs.redis)
    if on_failure is not None:
        through_outage(lambda: on_failure(code, message), jobs.redis)
    return "failed"
