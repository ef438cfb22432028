"""Every Redis key of the project, built in one place, and the canonical JSON they hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX = "fastif"

MODELS = f"{PREFIX}:models"  # zset: model id -> created time
JOBS = f"{PREFIX}:jobs"  # zset: job id -> created time
JOBS_QUEUED = f"{PREFIX}:jobs:queued"  # set of queued job ids, so queue depth is O(1)
WORKER_PATTERN = f"{PREFIX}:worker:*"
INFLIGHT = f"{PREFIX}:inflight"  # hash: Celery task id -> the task's worker, name and args while it runs


def canonical_json(payload: Any) -> str:
    """JSON with sorted keys and no spaces: equal payloads give equal bytes."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(payload: Any) -> str:
    """sha256 of the canonical JSON of `payload`."""
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def model(model_id: str) -> str:
    """Hash of one model record."""
    return f"{PREFIX}:model:{model_id}"


def job(job_id: str) -> str:
    """Hash of one job record."""
    return f"{PREFIX}:job:{job_id}"


def shard_state(job_id: str, *parts: object) -> str:
    """A parallel influence job's shard bookkeeping, `fastif:job:{id}:{part}:…`: its phase (workers/parallel.py),
    which shards are done, each shard's s_test and scores, the average and the candidates (all expire with the results)."""
    return ":".join([job(job_id), *map(str, parts)])


def results(job_id: str) -> str:
    """List of a job's result items as JSON strings, in input order."""
    return f"{PREFIX}:results:{job_id}"


def result_shard(job_id: str, shard: int) -> str:
    """List of one shard's result items of a dataset job, as JSON strings, in input order."""
    return f"{PREFIX}:results:{job_id}:{shard}"


def result_shards_done(job_id: str) -> str:
    """Set of the shards of a dataset job whose items are stored."""
    return f"{PREFIX}:results:{job_id}:done"


def idem(key: str, owner: str | None = None) -> str:
    """String: the job an Idempotency-Key created and the hash of its request.

    Scoped by the key's owner, so that two callers who pick the same Idempotency-Key get their own jobs.
    """
    return f"{PREFIX}:idem:{key}" if owner is None else f"{PREFIX}:idem:{owner}:{key}"


def jobs_of(owner: str) -> str:
    """Zset: the ids of the jobs `owner` created -> created time (what a client key may list)."""
    return f"{JOBS}:owner:{owner}"


def worker(hostname: str) -> str:
    """A worker's heartbeat (expires when the worker stops beating)."""
    return f"{PREFIX}:worker:{hostname}"


def cache_key(model_fp: str, kind: str, payload: dict[str, Any]) -> str:
    """Content-addressed cache key `fastif:v1:{model_fp}:{kind}:{sha256(canonical payload)}`."""
    return f"{PREFIX}:v1:{model_fp}:{kind}:{sha256_hex(payload)}"


def cache_pattern(model_fp: str) -> str:
    """SCAN pattern matching every cache key of one model fingerprint (glob chars escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in model_fp)
    return f"{PREFIX}:v1:{escaped}:*"
