"""records/: the Redis-side state machine the API and the workers share."""

from __future__ import annotations

import json

import threading

import pytest
import redis

from api_schemas import ModelCreate
from records import keys
from records.celery_app import make_celery
from records.errors import IdempotencyConflict, JobNotCancellable, JobNotFound, QueueFull
from records.heartbeat import alive_workers, beat
from records.jobs import JobStore
from records.models import ModelStore
from records.settings import settings_from


@pytest.fixture
def jobs(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, result_ttl_s=600)


def test_cache_keys_are_canonical() -> None:
    a = keys.cache_key("fp1", "s_test", {"text": "x", "cfg": {"damp": 0.005, "scale": 1e4}})
    b = keys.cache_key("fp1", "s_test", {"cfg": {"scale": 1e4, "damp": 0.005}, "text": "x"})
    assert a == b
    assert a.startswith("fastif:v1:fp1:s_test:") and len(a.rsplit(":", 1)[1]) == 64
    assert keys.cache_key("fp1", "s_test", {"text": "y"}) != a
    assert keys.canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_job_lifecycle(jobs: JobStore, redis_client: redis.Redis) -> None:
    job = jobs.create("influence", "m1", {"x": 1})
    assert (job.status, job.deliveries, job.started_at) == ("queued", 0, None)
    assert jobs.request(job.id) == {"x": 1}
    assert jobs.count_queued() == 1
    assert jobs.start_delivery(job.id) == 1
    assert jobs.count_queued() == 0
    started = jobs.get(job.id).started_at
    assert jobs.start_delivery(job.id) == 2  # a redelivery after a worker died
    assert jobs.get(job.id).started_at == started
    jobs.set_progress(job.id, "lissa", 10, 100)
    assert jobs.get(job.id).progress.model_dump() == {"stage": "lissa", "done": 10, "total": 100}
    assert jobs.succeed(job.id, [{"i": 0}, {"i": 1}])
    done = jobs.get(job.id)
    assert (done.status, done.result_count) == ("succeeded", 2)
    assert done.finished_at >= done.started_at
    assert jobs.results(job.id, 0, 10) == (2, [{"i": 0}, {"i": 1}])
    assert 0 < redis_client.ttl(keys.job(job.id)) <= 600
    assert 0 < redis_client.ttl(keys.results(job.id)) <= 600
    # Terminal is terminal.
    assert not jobs.fail(job.id, "late", "too late")
    assert not jobs.succeed(job.id, [{"i": 9}])
    assert jobs.start_delivery(job.id) == 0
    assert jobs.get(job.id).status == "succeeded"
    assert jobs.results(job.id, 0, 10)[1] == [{"i": 0}, {"i": 1}]


def test_a_dataset_jobs_results_are_its_stored_shards_in_input_order(jobs: JobStore, redis_client: redis.Redis) -> None:
    job = jobs.create("influence", "m", {"inputs_from": {"path": "in.jsonl"}}, inputs_total=7)
    assert (job.inputs_total, job.progress.total) == (7, 7)
    assert jobs.results(job.id) == (0, [])  # not split yet
    jobs.start_delivery(job.id)
    assert jobs.split_into_shards(job.id, 3, 3)  # 3 + 3 + 1
    assert not jobs.split_into_shards(job.id, 4, 2)  # once: a coordinator delivered again changes nothing
    items = {s: [{"input_index": i} for i in range(s * 3, min(7, s * 3 + 3))] for s in range(3)}
    assert jobs.store_shard_items(job.id, 2, items[2]) == 1
    # While it runs only the unbroken run of shards from the first is readable, so that a page never moves.
    assert jobs.results(job.id) == (0, [])
    assert jobs.store_shard_items(job.id, 0, items[0]) == 2
    assert jobs.results(job.id, 0, 10) == (3, [{"input_index": i} for i in (0, 1, 2)])
    assert jobs.results(job.id, 2, 2) == (3, [{"input_index": 2}])
    assert [json.loads(raw)["input_index"] for raw in jobs.iter_raw_results(job.id, chunk=2)] == [0, 1, 2]
    running = jobs.require(job.id)
    assert (running.status, running.result_count, running.progress.done) == ("running", 4, 4)
    # A shard stored again (its worker died after storing) keeps its items and counts once.
    assert jobs.store_shard_items(job.id, 0, [{"input_index": 99}] * 3) == 2
    assert jobs.require(job.id).result_count == 4
    assert jobs.store_shard_items(job.id, 1, items[1]) == 3
    assert jobs.results(job.id, 2, 3) == (7, [{"input_index": i} for i in (2, 3, 4)])  # paged across shards
    assert jobs.succeed_in_shards(job.id)
    done = jobs.require(job.id)
    assert (done.status, done.result_count, done.progress.stage) == ("succeeded", 7, "done")
    assert jobs.results(job.id, 1, 5) == (7, [{"input_index": i} for i in range(1, 6)])
    assert not jobs.succeed_in_shards(job.id)  # finished once
    assert jobs.store_shard_items(job.id, 1, items[1]) == -1  # a finished job's results no longer change
    for key in ("fastif:results:%s:%d" % (job.id, s) for s in range(3)):
        assert 0 < redis_client.ttl(key) <= jobs.result_ttl_s


def test_a_cancelled_dataset_job_keeps_every_stored_shard(jobs: JobStore) -> None:
    job = jobs.create("explain", "m", {}, inputs_total=6)
    jobs.start_delivery(job.id)
    jobs.split_into_shards(job.id, 3, 2)
    jobs.store_shard_items(job.id, 1, [{"input_index": 2}, {"input_index": 3}])
    assert jobs.results(job.id) == (0, [])  # running: shard 0 is missing
    jobs.request_cancel(job.id)
    assert jobs.mark_cancelled(job.id)
    # Over: every stored shard is readable, gaps and all, and nothing more is stored.
    assert jobs.results(job.id) == (2, [{"input_index": 2}, {"input_index": 3}])
    assert jobs.store_shard_items(job.id, 0, [{"input_index": 0}, {"input_index": 1}]) == -1
    assert jobs.require(job.id).result_count == 2
    assert not jobs.succeed_in_shards(job.id)
    assert jobs.store_shard_items("gone", 0, [{"input_index": 0}]) == -1


def test_succeed_with_no_items(jobs: JobStore) -> None:
    job = jobs.create("influence", "m", {})
    assert jobs.succeed(job.id, [])
    assert jobs.results(job.id, 0, 10) == (0, [])
    assert jobs.get(job.id).result_count == 0


def test_results_must_be_json(jobs: JobStore) -> None:
    job = jobs.create("influence", "m", {})
    with pytest.raises(ValueError):
        jobs.succeed(job.id, [{"score": float("nan")}])
    assert jobs.get(job.id).status == "queued"


def test_cancel_while_queued_wins_over_a_late_worker(jobs: JobStore) -> None:
    job = jobs.create("influence", "m", {})
    assert jobs.request_cancel(job.id).status == "cancelled"
    assert jobs.start_delivery(job.id) == 0  # the worker must drop the message
    assert not jobs.succeed(job.id, [{"i": 0}])
    assert jobs.get(job.id).status == "cancelled"
    assert jobs.results(job.id, 0, 10) == (0, [])
    with pytest.raises(JobNotCancellable):
        jobs.request_cancel(job.id)


def test_cancel_while_running_sets_a_flag(jobs: JobStore) -> None:
    job = jobs.create("influence", "m", {})
    jobs.start_delivery(job.id)
    assert not jobs.cancel_requested(job.id)
    flagged = jobs.request_cancel(job.id)
    assert (flagged.status, flagged.cancel_requested) == ("running", True)
    assert jobs.cancel_requested(job.id)
    assert jobs.mark_cancelled(job.id)
    assert jobs.get(job.id).status == "cancelled"
    with pytest.raises(JobNotFound):
        jobs.request_cancel("missing")


def test_fail_records_the_error(jobs: JobStore) -> None:
    job = jobs.create("influence", "m", {})
    assert jobs.fail(job.id, "too-many-deliveries", "delivered 4 times")
    failed = jobs.get(job.id)
    assert failed.status == "failed"
    assert failed.error.model_dump() == {"code": "too-many-deliveries", "message": "delivered 4 times"}
    assert jobs.count_queued() == 0


def test_writes_never_resurrect_a_missing_job(jobs: JobStore, redis_client: redis.Redis) -> None:
    jobs.set_progress("gone", "x", 1, 2)
    assert not jobs.hset("gone", {"shards_done": 1})
    assert not jobs.fail("gone", "c", "m")
    assert not jobs.succeed("gone", [{"i": 0}])
    assert jobs.start_delivery("gone") == 0
    with pytest.raises(JobNotFound):
        jobs.hincr("gone", "shards_done", 1)
    with pytest.raises(JobNotFound):
        jobs.request("gone")
    assert redis_client.keys("fastif:job:*") == []
    assert redis_client.keys("fastif:results:*") == []


def test_worker_counters(jobs: JobStore) -> None:
    job = jobs.create("influence", "m", {})
    assert jobs.hincr(job.id, "shards_done", 1) == 1
    assert jobs.hincr(job.id, "shards_done", 2) == 3
    assert jobs.hset(job.id, {"shards_total": 4})
    assert jobs.redis.hget(keys.job(job.id), "shards_total") == "4"
    with pytest.raises(ValueError):
        jobs.hset(job.id, {"status": "succeeded"})
    with pytest.raises(ValueError):
        jobs.hincr(job.id, "deliveries", 1)


def test_idempotency(jobs: JobStore) -> None:
    first = jobs.create("influence", "m", {"a": 1}, "key-1")
    assert jobs.create("influence", "m", {"a": 1}, "key-1").id == first.id
    assert jobs.create_or_replay("influence", "m", {"a": 1}, "key-1") == (jobs.get(first.id), False)
    with pytest.raises(IdempotencyConflict):
        jobs.create("influence", "m", {"a": 2}, "key-1")
    with pytest.raises(IdempotencyConflict):
        jobs.create("explain", "m", {"a": 1}, "key-1")
    assert jobs.create("influence", "m", {"a": 1}, "key-2").id != first.id


def test_idempotency_under_concurrency(jobs: JobStore) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(16)

    def create() -> None:
        barrier.wait()
        ids.append(jobs.create("influence", "m", {"a": 1}, "race").id)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 16 and len(set(ids)) == 1
    assert jobs.count_queued() == 1


def test_queue_limit(jobs: JobStore) -> None:
    a = jobs.create("influence", "m", {"i": 0}, max_queued=2)
    jobs.create("influence", "m", {"i": 1}, max_queued=2)
    with pytest.raises(QueueFull):
        jobs.create("influence", "m", {"i": 2}, max_queued=2)
    jobs.start_delivery(a.id)  # leaving the queue frees a slot
    jobs.create("influence", "m", {"i": 2}, max_queued=2)


def test_list_skips_expired_jobs(jobs: JobStore, redis_client: redis.Redis) -> None:
    ids = [jobs.create("influence", "m", {"i": i}).id for i in range(3)]
    redis_client.delete(keys.job(ids[1]))  # as if it had expired
    assert [j.id for j in jobs.list()] == [ids[2], ids[0]]
    assert redis_client.zcard(keys.JOBS) == 2
    assert jobs.count_by_status()["queued"] == 2


def test_a_bytes_client_works_too(redis_url: str, redis_client: redis.Redis) -> None:
    raw = redis.Redis.from_url(redis_url)  # workers may use decode_responses=False for tensors
    store = JobStore(raw)
    job = store.create("influence", "m", {"a": 1}, "k")
    assert store.create("influence", "m", {"a": 1}, "k").id == job.id
    assert store.start_delivery(job.id) == 1
    assert store.succeed(job.id, [{"i": 0}])
    assert store.results(job.id) == (1, [{"i": 0}])
    assert store.get(job.id).status == "succeeded"
    models = ModelStore(raw)
    model = models.create(_model_request())
    models.set_ready(model.id, "fp", 2, ["a", "b"])
    assert models.get(model.id).labels == ["a", "b"]
    raw.close()


def _model_request() -> ModelCreate:
    return ModelCreate(name="m", model_path="models/m", train_data={"path": "train.jsonl"})


def test_model_records(redis_client: redis.Redis) -> None:
    models = ModelStore(redis_client)
    model = models.create(_model_request())
    assert (model.status, model.labels, model.fingerprint) == ("building", None, None)
    assert models.set_build_job(model.id, "job-1")
    assert models.set_ready(model.id, "fp-a", 100, ["neg", "pos"])
    ready = models.get(model.id)
    assert (ready.status, ready.num_train, ready.labels, ready.fingerprint, ready.build_job_id) == (
        "ready", 100, ["neg", "pos"], "fp-a", "job-1")
    assert ready.ready_at is not None
    assert models.set_failed(model.id, "oom", "out of memory")
    assert models.get(model.id).error.code == "oom"
    second = models.create(_model_request())
    assert [m.id for m in models.list()] == [second.id, model.id]

    for i in range(1200):  # more than one SCAN batch
        redis_client.set(keys.cache_key("fp-a", "grad", {"i": i}), "x")
    redis_client.set(keys.cache_key("fp-ab", "grad", {"i": 0}), "x")  # a prefix, not a match
    assert models.delete(model.id)
    assert models.get(model.id) is None
    assert list(redis_client.scan_iter(match="fastif:v1:fp-a:*")) == []
    assert redis_client.exists(keys.cache_key("fp-ab", "grad", {"i": 0}))
    assert not models.delete(model.id)
    assert not models.set_ready(model.id, "fp-a", 1, ["x"])  # a late worker does not resurrect it
    assert models.get(model.id) is None


def test_cache_pattern_escapes_glob_characters() -> None:
    assert keys.cache_pattern("a*b?[c]") == "fastif:v1:a\\*b\\?\\[c\\]:*"


def test_heartbeats(redis_client: redis.Redis) -> None:
    assert alive_workers(redis_client) == []
    beat(redis_client, "gpu-0", {"queues": ["accel"]})
    beat(redis_client, "cpu-0", {"queues": ["cpu"]})
    workers = sorted(alive_workers(redis_client), key=lambda w: w["hostname"])
    assert [w["hostname"] for w in workers] == ["cpu-0", "gpu-0"]
    assert workers[1]["queues"] == ["accel"]
    assert 0 < redis_client.ttl(keys.worker("gpu-0")) <= 30
    redis_client.delete(keys.worker("gpu-0"))  # as if it expired
    assert [w["hostname"] for w in alive_workers(redis_client)] == ["cpu-0"]


def test_celery_configuration() -> None:
    app = make_celery(settings_from(redis_url="redis://127.0.0.1:6379/5", visibility_timeout_s=999))
    conf = app.conf
    assert conf.broker_url == conf.result_backend == "redis://127.0.0.1:6379/5"
    assert (conf.task_serializer, conf.result_serializer, list(conf.accept_content)) == ("json", "json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 999
    route = app.amqp.router.route
    assert route({}, "fastif.build_model")["queue"].name == "cpu"
    for name in ("fastif.influence", "fastif.explain", "fastif.graph", "fastif.correct", "fastif.self_influence"):
        assert route({}, name)["queue"].name == "accel"


def test_settings_from_ignores_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("FASTIF_API_KEYS", "secret")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:1/0")
    settings = settings_from(max_inputs=2)
    assert (settings.api_keys, settings.redis_url, settings.max_inputs) == ([], None, 2)
    assert settings.effective_redis_url == "redis://127.0.0.1:6379/0"
