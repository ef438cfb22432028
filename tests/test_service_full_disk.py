"""A full state volume fails a job with a code of its own, on the plain path and on a parallel shard."""

from __future__ import annotations

import errno
import json

import pytest

from records.jobs import JobStore
from records.settings import settings_from
from workers import parallel, runner, shards
from workers.context import WorkerContext


@pytest.fixture
def ctx(redis_client, redis_url, tmp_path, monkeypatch) -> WorkerContext:
    context = WorkerContext(settings_from(redis_url=redis_url, data_root=tmp_path))
    monkeypatch.setattr(runner, "context", lambda: context)
    monkeypatch.setattr(shards, "context", lambda: context)
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


def test_output_path_is_written_whole_or_not_at_all(ctx: WorkerContext, tmp_path, monkeypatch) -> None:
    items = [{"input_index": i, "text": f"é {i}"} for i in range(3)]
    job = JobStore(ctx.redis).create("influence", "m", {"output_path": "out.jsonl"})
    assert runner.run_job(job.id, lambda run: items) == "succeeded"
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()] == items

    # Swapped for a link out of the data root after the API looked: refused where the worker opens it.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "escape").symlink_to(outside)
    job = JobStore(ctx.redis).create("influence", "m", {"output_path": "escape/out.jsonl"})
    assert runner.run_job(job.id, lambda run: items) == "failed"
    assert ctx.jobs.require(job.id).error.code == "path-outside-data-root" and not list(outside.iterdir())

    # A full volume mid-write: the job fails as insufficient-storage and leaves no partial file behind.
    real_open = open

    def filling_open(path, mode="r", **kwargs):
        handle = real_open(path, mode, **kwargs)
        if "w" in mode:
            handle.write = full
        return handle

    monkeypatch.setattr("builtins.open", filling_open)
    job = JobStore(ctx.redis).create("influence", "m", {"output_path": "again.jsonl"})
    assert runner.run_job(job.id, lambda run: items) == "failed"
    monkeypatch.undo()
    assert ctx.jobs.require(job.id).error.code == "insufficient-storage"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape", "out.jsonl"]
