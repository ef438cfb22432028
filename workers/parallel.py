"""FastIF's parallel variant over Celery: W s_test shards, then W scoring shards.

Shard w estimates s_test with LiSSA seeded ``seed + w``; the estimates are averaged.
Which shards are done is a Redis set per job, not a bare counter: a redelivered
shard (its worker died) overwrites its own slot instead of counting twice, and the
last shard to arrive is the one that sees the set complete. The counts are mirrored
on the job record for clients to watch. No Celery chord is involved.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import redis
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from api_schemas import InfluenceRequest
from fastif import CancelledError, FastIFError, Influence
from fastif.config import SolverConfig
from fastif.report import result_items
from records.keys import shard_state

from .context import WorkerContext, context
from .configs import queries_of, solver_config
from .influence import engine_and_cache, ready_model, result_cache_key, store_results
from .runner import JobFailed, JobRun, ProgressReporter, unexpected_failure, wait_for_redis, write_output

STEST_SHARD = "fastif.stest_shard"
SCORE_SHARD = "fastif.score_shard"
TERMINAL = ("succeeded", "failed", "cancelled")


def shard_seed_config(request: InfluenceRequest, shard: int) -> SolverConfig:
    return solver_config(request, seed_offset=shard)


def averaged_key(request: InfluenceRequest) -> dict:
    return {"parallel": request.parallel}


def start_parallel(run: JobRun, request: InfluenceRequest, send) -> None:
    """The coordinator: reset shard state, then send W s_test shards (or go straight to scoring if cached)."""
    client = run.ctx.redis
    job_id = run.job_id
    # A redelivered coordinator must not send the shards twice (they may be running).
    if not client.set(shard_state(job_id, "shards_sent"), 1, nx=True, ex=run.ctx.settings.result_ttl_s):
        return
    run.ctx.jobs.hset(job_id, {"shards": request.parallel, "stest_shards_done": 0, "score_shards_done": 0})
    for shard in range(request.parallel):
        send(STEST_SHARD, [job_id, shard])


def _shard_guard(ctx: WorkerContext, job_id: str, shard: int, phase: str) -> bool:
    """False when the job is over; fails the job if this shard keeps losing its worker."""
    job = ctx.jobs.get(job_id)
    if job is None or job.status in TERMINAL:
        return False
    attempts = ctx.jobs.hincr(job_id, f"{phase}_{shard}_attempts")
    ctx.jobs.hset(job_id, {f"{phase}_{shard}_worker": socket.gethostname() + ":" + _node_name()})
    if attempts > ctx.settings.max_deliveries:
        ctx.jobs.fail(job_id, "redelivery-limit",
                      f"{phase} shard {shard} was started {attempts - 1} times and its worker died each time")
        return False
    return True


def _node_name() -> str:
    from celery import current_task

    request = getattr(current_task, "request", None)
    return getattr(request, "hostname", None) or "?"


def _run_shard(job_id: str, shard: int, phase: str, work) -> str:
    ctx = context()
    if not _shard_guard(ctx, job_id, shard, phase):
        return "skipped"
    progress = ProgressReporter(ctx.jobs, job_id)
    run = JobRun(job_id, ctx.jobs.request(job_id), 0, ctx, progress)
    try:
        work(run, InfluenceRequest.model_validate(run.request), shard)
    except CancelledError:
        ctx.jobs.mark_cancelled(job_id)
        return "cancelled"
    except (JobFailed, FastIFError) as err:
        ctx.jobs.fail(job_id, err.code, str(err))
        return "failed"
    except redis.RedisError:
        wait_for_redis(ctx.redis)  # the task's autoretry must publish to Redis: see run_job
        raise
    except Exception as err:
        code, message = unexpected_failure(err)
        ctx.jobs.fail(job_id, code, f"{phase} shard {shard}: {message}")
        return "failed"
    return "done"


def stest_shard(job_id: str, shard: int, send) -> str:
    return _run_shard(job_id, shard, "stest", lambda run, request, w: _stest_work(run, request, w, send))


def score_shard(job_id: str, shard: int) -> str:
    return _run_shard(job_id, shard, "score", _score_work)


def _stest_work(run: JobRun, request: InfluenceRequest, shard: int, send) -> None:
    model = ready_model(run, request.model_id)
    engine, cache = engine_and_cache(run, model)
    plan = engine.plan(queries_of(request), request.group, cache)
    # Each shard's own estimate is cached under its own seed, like any single-worker s_test.
    s_tests, diagnostics, _ = engine.cached_s_test(plan, shard_seed_config(request, shard), cache, run.progress)
    converged = bool(diagnostics["converged"])
    client = run.ctx.redis_bytes
    ttl = run.ctx.settings.result_ttl_s
    client.set(shard_state(run.job_id, "stest", shard), save_tensors({"s_test": s_tests.cpu().contiguous()}), ex=ttl)
    client.hset(shard_state(run.job_id, "stest_meta"), str(shard), json.dumps({"converged": converged}))
    client.expire(shard_state(run.job_id, "stest_meta"), ttl)
    client.sadd(shard_state(run.job_id, "stest_done"), shard)
    client.expire(shard_state(run.job_id, "stest_done"), ttl)  # like every key of the shard state
    done = client.scard(shard_state(run.job_id, "stest_done"))
    run.ctx.jobs.hset(run.job_id, {"stest_shards_done": done})
    # Exactly one shard starts the scoring: the one that wins this SETNX once the set is full.
    if done >= request.parallel and client.set(shard_state(run.job_id, "scoring_started"), 1, nx=True, ex=ttl):
        _average_and_cache(run, request, engine, plan, cache)
        for w in range(request.parallel):
            send(SCORE_SHARD, [run.job_id, w])


def _average_and_cache(run: JobRun, request, engine, plan, cache) -> None:
    client = run.ctx.redis_bytes
    shards = [load_tensors(client.get(shard_state(run.job_id, "stest", w)))["s_test"] for w in range(request.parallel)]
    averaged = sum(shards) / len(shards)
    solver_key = {**solver_config(request).cache_identity(), **averaged_key(request)}
    for row, key in enumerate(plan.keys):
        cache.put("s_test", {**key, **solver_key}, averaged[row])
    client.set(shard_state(run.job_id, "stest_avg"), save_tensors({"s_test": averaged.contiguous()}),
               ex=run.ctx.settings.result_ttl_s)


def _slice(count: int, shards: int, shard: int) -> slice:
    bounds = np.linspace(0, count, shards + 1).astype(int)
    return slice(int(bounds[shard]), int(bounds[shard + 1]))


def _score_work(run: JobRun, request: InfluenceRequest, shard: int) -> None:
    model = ready_model(run, request.model_id)
    engine, cache = engine_and_cache(run, model)
    client = run.ctx.redis_bytes
    averaged = load_tensors(client.get(shard_state(run.job_id, "stest_avg")))["s_test"]
    plan = engine.plan(queries_of(request), request.group, cache)
    clock = time.perf_counter()
    parts = []
    for row in range(len(plan.vectors)):
        found = engine.candidates(plan.search[row], request.k)
        parts.append(found.indices[_slice(len(found.indices), request.parallel, shard)])
    scores = [s.tolist() for s in engine.score_rows(averaged, parts, on_progress=run.progress)]
    payload = {"scores": scores, "seconds": time.perf_counter() - clock}
    ttl = run.ctx.settings.result_ttl_s
    client.set(shard_state(run.job_id, "scores", shard), json.dumps(payload), ex=ttl)
    client.sadd(shard_state(run.job_id, "score_done"), shard)
    client.expire(shard_state(run.job_id, "score_done"), ttl)
    done = client.scard(shard_state(run.job_id, "score_done"))
    run.ctx.jobs.hset(run.job_id, {"score_shards_done": done})
    if done >= request.parallel and client.set(shard_state(run.job_id, "merged"), 1, nx=True, ex=ttl):
        _merge(run, request, engine, plan, averaged)


def _merge(run: JobRun, request: InfluenceRequest, engine, plan, averaged) -> None:
    """The last scoring shard: concatenate the slices in order and store the job's results."""
    client = run.ctx.redis_bytes
    parts = [json.loads(client.get(shard_state(run.job_id, "scores", w))) for w in range(request.parallel)]
    meta = client.hgetall(shard_state(run.job_id, "stest_meta"))
    converged = all(json.loads(v)["converged"] for v in meta.values())
    influences = []
    for row in range(len(plan.vectors)):
        found = engine.candidates(plan.search[row], request.k)
        scores = np.concatenate([np.asarray(part["scores"][row], dtype=np.float64) for part in parts])
        if len(scores) != len(found.indices):
            raise JobFailed("internal-error", f"row {row}: {len(scores)} scores for {len(found.indices)} candidates")
        influences.append(Influence(
            indices=found.indices, scores=scores, distances=found.distances, converged=converged,
            s_test_norm=float(averaged[row].norm()), cached=False,
            seconds={**plan.seconds, "scoring": max(part["seconds"] for part in parts)},
            solver={"solver": "lissa", "curvature": request.curvature, "converged": converged, "shards": request.parallel},
        ))
    items = result_items(engine, plan.encoded, influences, request.top)
    store_results(run, result_cache_key(ready_model(run, request.model_id), request), items)
    write_output(run, items)
    run.ctx.jobs.succeed(run.job_id, items)
