"""A full state volume fails a job with a code of its own, on the plain path and on a parallel shard."""

from __future__ import annotations

import errno

import pytest

from records.jobs import JobStore
from records.settings import settings_from
from workers import parallel, runner
from workers.context import WorkerContext


@pytest.fixture
def ctx(redis_client, redis_url, tmp_path, monkeypatch) -> WorkerContext:
    context = WorkerContext(settings_from(redis_url=redis_url, data_root=tmp_path))
    monkeypatch.setattr(runner, "context", lambda: context)
    monkeypatch.setattr(parallel, "context", lambda: context)
    return context


def full(*_args):
    raise OSError(errno.ENOSPC, "No space left on device", "/state/graphs/g.png")


def test_a_full_disk_fails_the_job_as_insufficient_storage(ctx: WorkerContext) -> None:
    job = JobStore(ctx.redis).create("graph", "m", {"model_id": "m"})
    assert runner.run_job(job.id, full) == "failed"
    error = ctx.jobs.require(job.id).error
    assert error.code == "insufficient-storage"
    assert "no space left on the state volume writing /state/graphs/g.png" in error.message


def test_any_other_exception_is_still_an_internal_error(ctx: WorkerContext) -> None:
    job = JobStore(ctx.redis).create("graph", "m", {"model_id": "m"})

    def broken(_run):
        raise OSError(errno.EIO, "Input/output error")

    assert runner.run_job(job.id, broken) == "failed"
    assert ctx.jobs.require(job.id).error.code == "internal-error"


def test_a_full_disk_under_a_parallel_shard_fails_the_job_the_same_way(ctx: WorkerContext) -> None:
    job = JobStore(ctx.redis).create("influence", "0" * 32, {"model_id": "0" * 32, "inputs": [{"text": "x"}], "parallel": 2, "solver": "lissa"})
    ctx.jobs.start_delivery(job.id)
    assert parallel._run_shard(job.id, 0, "stest", lambda run, request, shard: full()) == "failed"
    error = ctx.jobs.require(job.id).error
    assert error.code == "insufficient-storage" and error.message.startswith("stest shard 0: no space left")
