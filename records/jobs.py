"""Job records in Redis: the source of truth for a job's status, progress and results.

A job is a hash `fastif:job:{id}`; `fastif:jobs` orders ids by creation time,
`fastif:jobs:owner:{name}` does the same for the jobs one API key created, and
`fastif:jobs:queued` holds the queued ones. Results are a list of JSON strings,
one per input; a dataset job's are one such list per shard, readable as each shard
finishes. Finished jobs and their results expire after `result_ttl_s`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from api_schemas import TERMINAL_STATUSES, ErrorInfo, Job, Progress

from . import _scripts, keys
from ._codec import optional_int, text, text_dict, timestamp
from ._hash_store import HashRecordStore
from .errors import IdempotencyConflict, JobNotCancellable, JobNotFound, QueueFull

# Fields the stores own; the generic `hset` refuses them so workers cannot break the state machine.
RESERVED_FIELDS = frozenset(
    {"id", "kind", "status", "model_id", "request", "request_hash", "created_at", "started_at",
     "finished_at", "deliveries", "cancel_requested", "result_count", "error_code", "error_message",
     "idempotency_key", "owner", "inputs_total", "result_shards", "shard_inputs"}
)
_LIST_CHUNK = 200


class JobStore(HashRecordStore[Job]):
    """Create, advance, cancel and read job records and their results.

    get(job_id) and require(job_id) (JobNotFound) come from HashRecordStore.
    """

    def __init__(self, client: redis.Redis, *, result_ttl_s: int = 7 * 86400) -> None:
        """Bind to a redis client; finished jobs and results live `result_ttl_s` seconds."""
        super().__init__(client, keys.job, _to_job, JobNotFound)
        self.result_ttl_s = result_ttl_s
        self._create = client.register_script(_scripts.CREATE_JOB)
        self._start = client.register_script(_scripts.START_DELIVERY)
        self._finish = client.register_script(_scripts.FINISH)
        self._cancel = client.register_script(_scripts.REQUEST_CANCEL)
        self._hset = client.register_script(_scripts.HSET_EXISTING)
        self._hincr = client.register_script(_scripts.HINCR_EXISTING)
        self._release_idem = client.register_script(_scripts.RELEASE_IDEM)
        self._store_shard = client.register_script(_scripts.STORE_SHARD_ITEMS)
        self._split_once = client.register_script(_scripts.SPLIT_ONCE)

    # -- creating ---------------------------------------------------------------------------

    def create(self, kind: str, model_id: str | None, request: dict[str, Any], idempotency_key: str | None = None, *,
               owner: str | None = None, max_queued: int = 0, inputs_total: int | None = None) -> Job:
        """Create a queued job; with an idempotency key, return the job it already made.

        `owner` names the API key that asked for it (None when the service runs without keys); the
        idempotency key is that owner's own. Raises IdempotencyConflict when the key was used for a
        different request, and QueueFull when `max_queued` > 0 jobs are already queued. Atomic (one
        Lua script). `inputs_total`: a dataset job's count of inputs, known before it runs.
        """
        return self.create_or_replay(kind, model_id, request, idempotency_key, owner=owner, max_queued=max_queued,
                                     inputs_total=inputs_total)[0]

    def create_or_replay(self, kind: str, model_id: str | None, request: dict[str, Any],
                         idempotency_key: str | None = None, *, owner: str | None = None,
                         max_queued: int = 0, inputs_total: int | None = None) -> tuple[Job, bool]:
        """create(), also saying whether the job is new (True) or an idempotent replay (False)."""
        request_hash = keys.sha256_hex(request)
        # The key identifies the request kind too: the same body sent to two endpoints differs.
        idem_hash = keys.sha256_hex({"kind": kind, "request_hash": request_hash})
        idem_key = keys.idem(idempotency_key or "", owner)
        for _ in range(2):
            job_id = uuid.uuid4().hex
            now = repr(time.time())
            fields = {
                "id": job_id, "kind": kind, "status": "queued", "model_id": model_id or "",
                "request": keys.canonical_json(request), "request_hash": request_hash,
                "created_at": now, "deliveries": "0", "cancel_requested": "0",
                "stage": "queued", "done": "0", "idempotency_key": idempotency_key or "", "owner": owner or "",
            }
            if inputs_total is not None:
                fields.update(inputs_total=str(inputs_total), total=str(inputs_total))
            idem_value = json.dumps({"job_id": job_id, "hash": idem_hash}) if idempotency_key else ""
            flat = [item for pair in fields.items() for item in pair]
            outcome, existing = self._create(
                keys=[keys.job(job_id), keys.JOBS, keys.JOBS_QUEUED, idem_key, keys.jobs_of(owner or "")],
                args=[job_id, now, idem_value, self.result_ttl_s, max_queued, "1" if owner else "0", *flat],
            )
            outcome = text(outcome)
            if outcome == "ok":
                return self.require(job_id), True
            if outcome == "full":
                raise QueueFull(f"{max_queued} jobs are already queued; retry later")
            previous = json.loads(text(existing) or "{}")
            if previous.get("hash") != idem_hash:
                raise IdempotencyConflict("this Idempotency-Key was already used with a different request")
            job = self.get(previous["job_id"])
            if job is not None:
                return job, False
            # The job the key points to is gone (expired or deleted): forget the key, create anew.
            self.redis.delete(idem_key)
        raise RuntimeError("could not create the job")  # pragma: no cover - needs a racing deleter

    def release_idempotency_key(self, job_id: str) -> bool:
        """Forget the Idempotency-Key that made this job, if it still points to it, so that a retry of the
        same request creates a new job; for a job that could not even be started. False when there was none."""
        key, owner = (text(v) for v in self.redis.hmget(keys.job(job_id), ["idempotency_key", "owner"]))
        if not key:
            return False
        return bool(self._release_idem(keys=[keys.idem(key, owner or None)], args=[job_id]))

    # -- reading ----------------------------------------------------------------------------

    def request(self, job_id: str) -> dict[str, Any]:
        """The request the job was created with; raises JobNotFound."""
        raw = self.redis.hget(keys.job(job_id), "request")
        if raw is None:
            raise JobNotFound(job_id)
        return json.loads(text(raw) or "{}")

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for; workers poll this between solver iterations."""
        return text(self.redis.hget(keys.job(job_id), "cancel_requested")) == "1"

    def results(self, job_id: str, offset: int = 0, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
        """(total, items[offset:offset+limit]) of a job's stored results.

        A dataset job's are the items of the shards stored so far, in input order (all of them
        once it has succeeded); `total` counts those.
        """
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        shards = self._stored_shards(job_id)
        if shards is not None:
            return self._shard_results(job_id, shards, offset, limit)
        if limit == 0:  # LRANGE 0 -1 would mean "everything"
            return int(self.redis.llen(keys.results(job_id))), []
        pipe = self.redis.pipeline(transaction=True)
        pipe.llen(keys.results(job_id))
        pipe.lrange(keys.results(job_id), offset, offset + limit - 1)
        total, raw = pipe.execute()
        return int(total), [json.loads(text(item) or "null") for item in raw]

    def iter_raw_results(self, job_id: str, chunk: int = 500) -> Iterator[str]:
        """Every stored result item as its JSON text, in input order, read `chunk` at a time (for streaming).

        The count is read first: a finished job's results never change, and an expired list ends the stream early.
        A dataset job's are the items of the shards stored when the stream starts.
        """
        shards = self._stored_shards(job_id)
        lists = [keys.results(job_id)] if shards is None else [keys.result_shard(job_id, s) for s, _ in shards]
        for key in lists:
            total = int(self.redis.llen(key))
            for start in range(0, total, chunk):
                for raw in self.redis.lrange(key, start, min(total, start + chunk) - 1):
                    yield text(raw) or "null"

    # -- dataset jobs: results in shards --------------------------------------------------------

    def split_into_shards(self, job_id: str, shards: int, shard_inputs: int) -> bool:
        """Record, once, that a dataset job's inputs run as `shards` shards of `shard_inputs` (the last may be shorter);
        False when it was recorded already (or the job is gone)."""
        return bool(self._split_once(keys=[keys.job(job_id)], args=["result_shards", shards, "shard_inputs", shard_inputs,
                                                                   "result_count", 0, "stage", "inputs"]))

    def shard_count(self, job_id: str) -> int | None:
        """How many shards a dataset job was split into; None before it was split."""
        return optional_int(text(self.redis.hget(keys.job(job_id), "result_shards")))

    def stored_shards(self, job_id: str) -> set[int]:
        """The shards of a dataset job whose items are stored."""
        return {int(text(s) or 0) for s in self.redis.smembers(keys.result_shards_done(job_id))}

    def store_shard_items(self, job_id: str, shard: int, items: list[dict[str, Any]]) -> int:
        """Store one shard's items (once: a shard done again keeps the first) and count them as done; returns how many
        shards are stored, or -1 when the job is gone or over. The items are readable at once."""
        encoded = [json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False) for item in items]
        return int(self._store_shard(keys=[keys.job(job_id), keys.result_shard(job_id, shard), keys.result_shards_done(job_id)],
                                     args=[shard, self.result_ttl_s, len(encoded), *encoded]))

    def succeed_in_shards(self, job_id: str) -> bool:
        """Mark a dataset job whose shards are all stored succeeded; False if the job was gone or finished."""
        job_key = keys.job(job_id)

        def write(pipe: redis.client.Pipeline) -> bool:
            status, count = (text(v) for v in pipe.hmget(job_key, ["status", "result_shards"]))
            if status is None or status in TERMINAL_STATUSES:
                return False
            pipe.multi()
            pipe.hset(job_key, mapping={"status": "succeeded", "finished_at": repr(time.time()), "stage": "done"})
            pipe.srem(keys.JOBS_QUEUED, job_id)
            for key in [job_key, keys.result_shards_done(job_id),
                        *(keys.result_shard(job_id, s) for s in range(int(count or 0)))]:
                pipe.expire(key, self.result_ttl_s)
            return True

        return bool(self.redis.transaction(write, job_key, value_from_callable=True))

    def _stored_shards(self, job_id: str) -> list[tuple[int, int]] | None:
        """A dataset job's readable shards in input order as (shard, items); None for any other job.

        While the job runs, the unbroken run of stored shards from the first: a shard stored
        later only adds items after those already readable, so a page, once read, never moves.
        Once the job is over, every stored shard (a cancelled job keeps what finished).
        """
        total, count, size, status = (text(v) for v in self.redis.hmget(
            keys.job(job_id), ["inputs_total", "result_shards", "shard_inputs", "status"]))
        if total is None:
            return None
        if count is None or size is None:  # not split yet: nothing stored
            return []
        total_n, count_n, size_n = int(total), int(count), int(size)
        done = sorted(int(text(s) or 0) for s in self.redis.smembers(keys.result_shards_done(job_id)))
        readable = [s for s in done if 0 <= s < count_n]
        if status not in TERMINAL_STATUSES:
            readable = [s for position, s in enumerate(readable) if s == position]
        return [(s, min(size_n, total_n - s * size_n)) for s in readable]

    def _shard_results(self, job_id: str, shards: list[tuple[int, int]], offset: int,
                       limit: int) -> tuple[int, list[dict[str, Any]]]:
        """items[offset:offset+limit] over the stored shards' lists, one LRANGE per shard the page touches."""
        total = sum(size for _, size in shards)
        pipe = self.redis.pipeline(transaction=False)
        start = 0
        for shard, size in shards:
            lo, hi = max(offset, start), min(offset + limit, start + size)
            if lo < hi:
                pipe.lrange(keys.result_shard(job_id, shard), lo - start, hi - start - 1)
            start += size
        return total, [json.loads(text(item) or "null") for part in pipe.execute() for item in part]

    def list(self, status: str | None = None, limit: int = 50, *, owner: str | None = None) -> list[Job]:
        """The newest jobs first, optionally only those in `status` or only `owner`'s; forgets expired ids."""
        index = keys.JOBS if owner is None else keys.jobs_of(owner)
        found: list[Job] = []
        start = 0
        while len(found) < limit:
            ids = [text(i) for i in self.redis.zrevrange(index, start, start + _LIST_CHUNK - 1)]
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))  # type: ignore[arg-type]
            gone = []
            for job_id, raw in zip(ids, pipe.execute(), strict=True):
                if not raw:
                    gone.append(job_id)
                    continue
                job = _to_job(text_dict(raw))
                if status is None or job.status == status:
                    found.append(job)
            if gone:
                self.redis.zrem(index, *gone)
                start -= len(gone)
        return found[:limit]

    def count_queued(self) -> int:
        """How many jobs are queued (not yet picked up by a worker)."""
        return int(self.redis.scard(keys.JOBS_QUEUED))

    def count_by_status(self, max_jobs: int = 100_000) -> dict[str, int]:
        """Jobs per status over the newest `max_jobs` records (for the metrics gauge)."""
        counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
        for start in range(0, max_jobs, 1000):
            ids = [text(i) for i in self.redis.zrevrange(keys.JOBS, start, start + 999)]
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(keys.job(job_id), "status")  # type: ignore[arg-type]
            for status in pipe.execute():
                status = text(status)
                if status in counts:
                    counts[status] += 1
        return counts

    # -- advancing (workers) ----------------------------------------------------------------

    def start_delivery(self, job_id: str) -> int:
        """Mark running (started_at set once) and return the delivery count, counting this one.

        Returns 0 when the job is gone or already finished (for example cancelled while
        queued): the worker must then drop the message without doing the work.
        """
        return int(self._start(keys=[keys.job(job_id), keys.JOBS_QUEUED], args=[job_id, repr(time.time())]))

    def set_progress(self, job_id: str, stage: str, done: int, total: int | None) -> None:
        """Report progress: `done` of `total` units of `stage`."""
        self._hset(
            keys=[keys.job(job_id)],
            args=["stage", stage, "done", int(done), "total", "" if total is None else int(total)],
        )

    def hset(self, job_id: str, mapping: dict[str, Any]) -> bool:
        """Write worker-owned fields (shard counters...) on an existing job; False if it is gone."""
        reserved = RESERVED_FIELDS.intersection(mapping)
        if reserved:
            raise ValueError(f"fields owned by JobStore: {sorted(reserved)}")
        if not mapping:
            return self.redis.exists(keys.job(job_id)) == 1
        flat = [item for pair in mapping.items() for item in pair]
        return bool(self._hset(keys=[keys.job(job_id)], args=flat))

    def hincr(self, job_id: str, field: str, by: int = 1) -> int:
        """Atomically add `by` to an integer field of the job and return it; raises JobNotFound."""
        if field in RESERVED_FIELDS:
            raise ValueError(f"field owned by JobStore: {field}")
        value = self._hincr(keys=[keys.job(job_id)], args=[field, int(by)])
        if value is None:
            raise JobNotFound(job_id)
        return int(value)

    def succeed(self, job_id: str, items: list[dict[str, Any]]) -> bool:
        """Store all results and mark succeeded in one MULTI; False if the job was gone or finished.

        Both the record and the results then expire after result_ttl_s.
        """
        encoded = [json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False) for item in items]
        job_key, results_key = keys.job(job_id), keys.results(job_id)

        def write(pipe: redis.client.Pipeline) -> bool:
            # WATCH is on: a concurrent cancel between this read and EXEC aborts and retries.
            status = text(pipe.hget(job_key, "status"))
            if status is None or status in TERMINAL_STATUSES:
                return False
            pipe.multi()
            pipe.delete(results_key)
            if encoded:
                pipe.rpush(results_key, *encoded)
                pipe.expire(results_key, self.result_ttl_s)
            pipe.hset(job_key, mapping={
                "status": "succeeded", "finished_at": repr(time.time()), "result_count": len(encoded),
                "stage": "done",
            })
            pipe.srem(keys.JOBS_QUEUED, job_id)
            pipe.expire(job_key, self.result_ttl_s)
            return True

        return bool(self.redis.transaction(write, job_key, value_from_callable=True))

    def fail(self, job_id: str, code: str, message: str) -> bool:
        """Mark failed with an error {code, message}; False if the job was gone or finished."""
        return self._finish_as(job_id, "failed", ["error_code", code, "error_message", message])

    def mark_cancelled(self, job_id: str) -> bool:
        """A worker saw the cancel flag and stopped; False if the job was gone or finished."""
        return self._finish_as(job_id, "cancelled", [])

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or flag a running one; raises JobNotCancellable or JobNotFound."""
        outcome = text(self._cancel(
            keys=[keys.job(job_id), keys.JOBS_QUEUED], args=[job_id, repr(time.time()), self.result_ttl_s]
        ))
        if outcome == "missing":
            raise JobNotFound(job_id)
        if outcome == "finished":
            raise JobNotCancellable(job_id)
        return self.require(job_id)

    # -- internals --------------------------------------------------------------------------

    def _finish_as(self, job_id: str, status: str, fields: list[Any]) -> bool:
        """Move a live job to a terminal status with extra fields; start its expiry."""
        return bool(self._finish(
            keys=[keys.job(job_id), keys.JOBS_QUEUED],
            args=[job_id, status, repr(time.time()), self.result_ttl_s, *fields],
        ))


def _to_job(fields: dict[str, str]) -> Job:
    """A job hash -> the Job resource."""
    error = None
    if fields.get("error_code"):
        error = ErrorInfo(code=fields["error_code"], message=fields.get("error_message", ""))
    return Job(
        id=fields["id"],
        kind=fields["kind"],
        status=fields["status"],  # type: ignore[arg-type]
        progress=Progress(
            stage=fields.get("stage") or None,
            done=optional_int(fields.get("done")) or 0,
            total=optional_int(fields.get("total")),
        ),
        created_at=timestamp(fields["created_at"]),  # type: ignore[arg-type]
        started_at=timestamp(fields.get("started_at")),
        finished_at=timestamp(fields.get("finished_at")),
        error=error,
        model_id=fields.get("model_id") or None,
        request_hash=fields["request_hash"],
        result_count=optional_int(fields.get("result_count")),
        deliveries=optional_int(fields.get("deliveries")) or 0,
        cancel_requested=fields.get("cancel_requested") == "1",
        owner=fields.get("owner") or None,
        inputs_total=optional_int(fields.get("inputs_total")),
    )
