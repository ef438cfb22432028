"""What every job split into shard tasks shares: a phase moved by compare-and-set, and each shard's guard.

A job's phase is one key of its shard state (records/keys.py ``shard_state``); moving it on is a
compare-and-set, so that of all the shards that see their part done exactly one goes on. Each
shard task counts its starts on the job record: a shard whose worker keeps dying fails the job.
The parallel influence job (workers/parallel.py), the sharded build (workers/build.py) and dataset jobs
(workers/dataset.py) run on it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from api_schemas import TERMINAL_STATUSES
from records.keys import shard_state

from .context import WorkerContext, context
from .runner import JobRun, OnFailure, ProgressReporter, fail_job, run_step, waiting_out_redis

# Compare-and-set of the phase key: KEYS[1] the key; ARGV the phase expected ("" for none), the next one, the TTL.
_ADVANCE = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def advance(ctx: WorkerContext, job_id: str, expected: str | None, next_phase: str) -> bool:
    """Move the job from phase ``expected`` (None: no phase yet) to ``next_phase``; True for the one caller that did."""
    move = ctx.redis.register_script(_ADVANCE)
    return bool(move(keys=[shard_state(job_id, "phase")], args=[expected or "", next_phase, ctx.settings.result_ttl_s]))


def phase_of(ctx: WorkerContext, job_id: str) -> str | None:
    return ctx.redis.get(shard_state(job_id, "phase"))


def send_once(ctx: WorkerContext, job_id: str, part: str, task: str, shards: Iterable[int],
              send: Callable[[str, list], None]) -> list[int]:
    """Send ``task`` for each of ``shards`` that was not sent for this job's ``part`` before; the shards sent now.

    A published task is not lost (acks late: a worker that dies has it delivered again), so a coordinator
    delivered again sends only what its first delivery had not. Each shard is marked after it is published:
    one that dies in between sends that shard twice (a shard done twice is stored once), never none.
    """
    sent_key = shard_state(job_id, part, "sent")
    sent = {int(shard) for shard in ctx.redis.smembers(sent_key)}
    now = []
    for shard in shards:
        if shard in sent:
            continue
        send(task, [job_id, shard])
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.sadd(sent_key, shard)
        pipe.expire(sent_key, ctx.settings.result_ttl_s)
        pipe.execute()
        now.append(shard)
    return now


def shard_guard(ctx: WorkerContext, job_id: str, shard: int, part: str, on_failure: OnFailure | None = None) -> bool:
    """False when the job is over; fails the job if this shard keeps losing its worker."""
    job = ctx.jobs.get(job_id)
    if job is None or job.status in TERMINAL_STATUSES:
        return False
    attempts = ctx.jobs.hincr(job_id, f"{part}_{shard}_attempts")
    ctx.jobs.hset(job_id, {f"{part}_{shard}_worker": socket.gethostname() + ":" + _node_name()})
    if attempts > ctx.settings.max_deliveries:
        fail_job(ctx.jobs, job_id, "redelivery-limit",
                 f"{part} shard {shard} was started {attempts - 1} times and its worker died each time", on_failure)
        return False
    return True


def _node_name() -> str:
    from celery import current_task

    request = getattr(current_task, "request", None)
    return getattr(request, "hostname", None) or "?"


def run_shard(job_id: str, shard: int, part: str, work: Callable[[JobRun], None],
              on_failure: OnFailure | None = None) -> str:
    """One shard task: "skipped" when the job is over, "done" when the shard did its part, else how the job ended
    (an error ends it through runner.run_step, as any job's; ``on_failure`` hears of it too)."""
    ctx = context()
    with waiting_out_redis(ctx.redis):
        if not shard_guard(ctx, job_id, shard, part, on_failure):
            return "skipped"
        run = JobRun(job_id, ctx.jobs.request(job_id), 0, ctx, ProgressReporter(ctx.jobs, job_id))

        def step() -> str:
            work(run)
            return "done"

        return run_step(run, step, on_failure, part=f"{part} shard {shard}")
