"""FastIF's parallel variant over Celery, as a small state machine: W s_test shards, then W scoring shards.

Where a job stands is one key of its shard state, ``phase`` (records/keys.py ``shard_state``).
Each move to the next phase is a compare-and-set (workers/shards.py), so exactly one task makes it,
and a phase one shard carries forward names that shard (``average-w``), so that if its worker dies
on the way, its redelivery, and no other task, takes it up again:

    (none) --coordinator--> stest --last s_test shard w--> average-w --w--> score-w --last scoring shard s--> merge-s

- coordinate (the influence task, ``start_parallel``): none -> stest, then send W STEST_SHARD
  messages. A redelivered coordinator finds the phase set and sends nothing.
- stest (``stest_shard`` w): LiSSA seeded ``seed + w`` (its estimate cached under its own seed,
  like any single-worker s_test) into slot w, and w joins the phase's done set: a redelivered
  shard overwrites its own slot and counts once. The shard that sees the set full and wins
  stest -> average-w goes on:
- average-w: the mean of the W estimates, cached under the request's solver key plus the shard
  count; each row's kNN candidates and the inputs' predictions, found once for every later
  task; then average-w -> score-w, and W SCORE_SHARD messages (sent again by w's redelivery
  while the phase is score-w: a scoring shard that runs twice counts once).
- score (``score_shard`` s): slice s of each row's candidates, scored against the average.
  The shard that sees the set full and wins score-w -> merge-s goes on:
- merge-s: the slices concatenated in order become the job's results, stored by
  ``runner.finish`` as every job's are (checked against the contract, written to
  `output_path`, kept through a Redis outage).

A shard that finds its phase over has nothing to add and does nothing. The done counts are
mirrored on the job record (`shards`, `stest_shards_done`, `score_shards_done`) for clients to
watch; a shard started more than max_deliveries times fails the job; a shard of a job that is
over is skipped. No Celery chord is involved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import numpy as np
import safetensors.numpy
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from api_schemas import InfluenceRequest, ResultItem
from fastif import Influence, InfluenceEngine
from fastif.config import SolverConfig
from records.keys import shard_state

from .configs import queries_of, solver_config
from .registry import engine_and_cache, ready_model
from .result_cache import result_cache_key, store_results
from .results import influence_items, stored_items
from .runner import HANDED_ON, HandedOn, JobFailed, JobRun, finish
from .shards import advance, phase_of, run_shard, send_once

STEST_SHARD = "fastif.stest_shard"
SCORE_SHARD = "fastif.score_shard"

SendTask = Callable[[str, list], None]
"""``send(task_name, args)``: publish a task (the Celery app's send_task)."""


class Phase(StrEnum):
    STEST = "stest"
    AVERAGE = "average"
    SCORE = "score"
    MERGE = "merge"


def _current(run: JobRun) -> str:
    """The job's phase; a job with no phase at all has lost its shard state and fails."""
    current = phase_of(run.ctx, run.job_id)
    if current is None:
        raise JobFailed("internal-error", "the parallel job's shard state is gone (a shard found no phase)")
    return current


def _owned(phase: Phase, shard: int) -> str:
    """The phase ``phase`` as shard ``shard`` holds it: only that shard's redelivery takes it up again."""
    return f"{phase}-{shard}"


def shard_seed_config(request: InfluenceRequest, shard: int) -> SolverConfig:
    return solver_config(request, seed_offset=shard)


def averaged_key(request: InfluenceRequest) -> dict:
    """What tells the averaged s_test apart from a single seed's in the cache."""
    return {"parallel": request.parallel}


# -- coordinate ----------------------------------------------------------------------------------
def start_parallel(run: JobRun, request: InfluenceRequest, send: SendTask) -> HandedOn:
    """The coordinator: none -> stest, then the W s_test shards; the shards finish the job."""
    if advance(run.ctx, run.job_id, None, Phase.STEST):
        run.ctx.jobs.hset(run.job_id, {"shards": request.parallel, "stest_shards_done": 0, "score_shards_done": 0})
    # Also when delivered again: a coordinator that died after moving the phase has sent only some shards, or none.
    if phase_of(run.ctx, run.job_id) == Phase.STEST:
        send_once(run.ctx, run.job_id, Phase.STEST, STEST_SHARD, range(request.parallel), send)
    return HANDED_ON


# -- the shard tasks -----------------------------------------------------------------------------
def stest_shard(job_id: str, shard: int, send: SendTask) -> str:
    return _run_shard(job_id, shard, Phase.STEST, partial(_stest_work, send=send))


def score_shard(job_id: str, shard: int) -> str:
    return _run_shard(job_id, shard, Phase.SCORE, _score_work)


ShardWork = Callable[[JobRun, InfluenceRequest, int], None]


def _run_shard(job_id: str, shard: int, phase: str, work: ShardWork) -> str:
    """One shard task of the job (workers/shards.py), with the job's request."""
    return run_shard(job_id, shard, phase, lambda run: work(run, InfluenceRequest.model_validate(run.request), shard))


def _count_done(run: JobRun, phase: Phase, shard: int) -> int:
    """Add ``shard`` to the phase's done set (a shard delivered again counts once); the count, also on the job record."""
    done_set = shard_state(run.job_id, f"{phase}_done")
    client = run.ctx.redis
    client.sadd(done_set, shard)
    client.expire(done_set, run.ctx.settings.result_ttl_s)  # like every key of the shard state
    done = client.scard(done_set)
    run.ctx.jobs.hset(run.job_id, {f"{phase}_shards_done": done})
    return done


# -- stest, then average -------------------------------------------------------------------------
def _stest_work(run: JobRun, request: InfluenceRequest, shard: int, send: SendTask) -> None:
    phase = _current(run)
    averager, sender = _owned(Phase.AVERAGE, shard), _owned(Phase.SCORE, shard)
    if phase == Phase.STEST:
        engine, cache = engine_and_cache(run, ready_model(run, request.model_id))
        plan = engine.plan(queries_of(request), request.group, cache)
        # Each shard's own estimate is cached under its own seed, like any single-worker s_test.
        s_tests, diagnostics, _, _ = engine.cached_s_test(plan, shard_seed_config(request, shard), cache, run.progress)
        client = run.ctx.redis_bytes
        ttl = run.ctx.settings.result_ttl_s
        client.set(shard_state(run.job_id, "stest", shard), save_tensors({"s_test": s_tests.cpu().contiguous()}), ex=ttl)
        client.hset(shard_state(run.job_id, "stest_meta"), str(shard), json.dumps({"converged": bool(diagnostics["converged"])}))
        client.expire(shard_state(run.job_id, "stest_meta"), ttl)
        if not (_count_done(run, Phase.STEST, shard) >= request.parallel
                and advance(run.ctx, run.job_id, Phase.STEST, averager)):
            return
        phase = averager
    elif phase not in (averager, sender):
        return  # the estimates were averaged already: a late copy of this shard has nothing to add
    # This shard won the average: it averages and sends the scoring shards, or, delivered again because
    # its worker died on the way, does what is left (a scoring shard sent twice counts once).
    if phase == averager:
        engine, cache = engine_and_cache(run, ready_model(run, request.model_id))
        _average(run, request, engine, engine.plan(queries_of(request), request.group, cache), cache)
        if not advance(run.ctx, run.job_id, averager, sender):
            raise JobFailed("internal-error", "the parallel job left the average phase while it was being averaged")
    for w in range(request.parallel):
        send(SCORE_SHARD, [run.job_id, w])


def _average(run: JobRun, request: InfluenceRequest, engine: InfluenceEngine, plan, cache) -> None:
    """Phase average: the shards' mean s_test, cached as the parallel request's; the candidates every later task scores."""
    client = run.ctx.redis_bytes
    ttl = run.ctx.settings.result_ttl_s
    shards = [load_tensors(client.get(shard_state(run.job_id, "stest", w)))["s_test"] for w in range(request.parallel)]
    averaged = sum(shards) / len(shards)
    solver_key = {**solver_config(request).cache_identity(), **averaged_key(request)}
    for row, key in enumerate(plan.keys):
        cache.put("s_test", {**key, **solver_key}, averaged[row])
    client.set(shard_state(run.job_id, "stest_avg"), save_tensors({"s_test": averaged.contiguous()}), ex=ttl)
    found = [engine.candidates(query, request.k) for query in plan.search]
    scoring = ScoringPlan(indices=[f.indices for f in found], distances=[f.distances for f in found],
                          probs=plan.encoded.probs, labels_used=list(plan.encoded.labels_used),
                          gradients_seconds=plan.seconds["gradients"])
    client.set(shard_state(run.job_id, "candidates"), scoring.to_bytes(), ex=ttl)


@dataclass
class ScoringPlan:
    """What the scoring shards and the merge need of the query, found once in the average phase.

    ``probs`` and ``labels_used`` are the inputs' predictions, as EncodedQueries has them
    (workers/results.py builds the items from them).
    """

    indices: list[np.ndarray]  # per row: its kNN candidates, nearest first
    distances: list[np.ndarray | None]  # per row; None when every training example is a candidate
    probs: np.ndarray  # [inputs, classes]
    labels_used: list[int]
    gradients_seconds: float  # encoding the inputs and taking their gradients

    def to_bytes(self) -> bytes:
        arrays = {"probs": np.ascontiguousarray(self.probs), "labels_used": np.asarray(self.labels_used, dtype=np.int64),
                  "gradients_seconds": np.asarray([self.gradients_seconds], dtype=np.float64)}
        for row, (indices, distances) in enumerate(zip(self.indices, self.distances)):
            arrays[f"indices_{row}"] = np.ascontiguousarray(indices)
            if distances is not None:
                arrays[f"distances_{row}"] = np.ascontiguousarray(distances)
        return safetensors.numpy.save(arrays)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ScoringPlan:
        arrays = safetensors.numpy.load(raw)
        rows = sum(1 for name in arrays if name.startswith("indices_"))
        return cls(indices=[arrays[f"indices_{row}"] for row in range(rows)],
                   distances=[arrays.get(f"distances_{row}") for row in range(rows)],
                   probs=arrays["probs"], labels_used=[int(label) for label in arrays["labels_used"]],
                   gradients_seconds=float(arrays["gradients_seconds"][0]))


# -- score, then merge ---------------------------------------------------------------------------
def _slice(count: int, shards: int, shard: int) -> slice:
    bounds = np.linspace(0, count, shards + 1).astype(int)
    return slice(int(bounds[shard]), int(bounds[shard + 1]))


def _score_work(run: JobRun, request: InfluenceRequest, shard: int) -> None:
    phase = _current(run)
    merger = _owned(Phase.MERGE, shard)
    if not (phase.startswith(f"{Phase.SCORE}-") or phase == merger):
        return  # the merge has begun: a late copy of this shard has nothing to add
    engine, _ = engine_and_cache(run, ready_model(run, request.model_id))
    client = run.ctx.redis_bytes
    averaged = load_tensors(client.get(shard_state(run.job_id, "stest_avg")))["s_test"]
    scoring = ScoringPlan.from_bytes(client.get(shard_state(run.job_id, "candidates")))
    if phase != merger:
        clock = time.perf_counter()
        parts = [indices[_slice(len(indices), request.parallel, shard)] for indices in scoring.indices]
        scores = [s.tolist() for s in engine.score_rows(averaged, parts, on_progress=run.progress)]
        payload = {"scores": scores, "seconds": time.perf_counter() - clock}
        client.set(shard_state(run.job_id, "scores", shard), json.dumps(payload), ex=run.ctx.settings.result_ttl_s)
        if not (_count_done(run, Phase.SCORE, shard) >= request.parallel and advance(run.ctx, run.job_id, phase, merger)):
            return
    # This shard won the merge (again, if its worker died while merging: its redelivery merges).
    _merge(run, request, engine, scoring, averaged)


def _merge(run: JobRun, request: InfluenceRequest, engine: InfluenceEngine, scoring: ScoringPlan, averaged) -> None:
    """Phase merge: concatenate the slices in order and store the job's results as every job's are (runner.finish)."""
    client = run.ctx.redis_bytes
    parts = [json.loads(client.get(shard_state(run.job_id, "scores", w))) for w in range(request.parallel)]
    meta = client.hgetall(shard_state(run.job_id, "stest_meta"))
    converged = all(json.loads(v)["converged"] for v in meta.values())
    # The slowest scoring shard is the job's scoring time.
    seconds = {"gradients": scoring.gradients_seconds, "scoring": max(part["seconds"] for part in parts)}
    solver = {"solver": "lissa", "curvature": request.curvature, "converged": converged, "shards": request.parallel}
    influences = []
    for row, (indices, distances) in enumerate(zip(scoring.indices, scoring.distances)):
        scores = np.concatenate([np.asarray(part["scores"][row], dtype=np.float64) for part in parts])
        if len(scores) != len(indices):
            raise JobFailed("internal-error", f"row {row}: {len(scores)} scores for {len(indices)} candidates")
        influences.append(Influence(indices=indices, scores=scores, distances=distances, converged=converged,
                                    s_test_norm=float(averaged[row].norm()), cached=False, seconds=seconds, solver=solver))
    items = influence_items(engine, scoring, influences, request.top)
    store_results(run, result_cache_key(ready_model(run, request.model_id), request), stored_items(ResultItem, items))
    finish(run, items, ResultItem)
