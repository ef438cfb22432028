"""FastIF's parallel variant (workers/parallel.py) run shard by shard in this process, on the real Redis.

The shard tasks are the workers' own functions; only the Celery transport is replaced by a
list of sent messages that the test delivers itself, in the order it chooses (last shard
first, a shard delivered twice). Every job is checked against the average of single-seed
LiSSA estimates computed by a separate engine, so a wrong average (over the inputs instead
of the shards, say), a wrong slice or a wrong merge fails on the scores. The same job over
real worker processes is tests/test_integration_parallel_shards.py.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from api_schemas import InfluenceRequest, ModelCreate
from fastif import DataSpec, InfluenceEngine, LissaConfig, Query
from records.keys import shard_state
from records.settings import settings_from
from tiny import make_tiny_bert, sentences, write_jsonl
from workers import parallel, registry, shards
from workers.configs import queries_of, solver_config
from workers.context import WorkerContext
from workers.registry import engine_for
from workers.results import result_items
from workers.runner import JobRun, ProgressReporter
from workers.tensor_cache import RedisTensorCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LISSA = {"damp": 0.01, "scale": 1000.0, "depth": 40, "batch_size": 2, "repeats": 1, "seed": 11}
TEXTS = ["the film was really good", "awful boring plot", "quite a lovely story but weak acting"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel-root")
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(40, seed=2, noise=0.1))
    return root


@pytest.fixture
def ctx(redis_client, redis_url, data_root, monkeypatch) -> WorkerContext:
    settings = settings_from(redis_url=redis_url, data_root=data_root, max_deliveries=2)
    context = WorkerContext(settings)
    monkeypatch.setattr(shards, "context", lambda: context)
    return context


@pytest.fixture(scope="module")
def worker_engine(data_root) -> InfluenceEngine:
    """The engine a worker process would load for the model (built once for the module, like a warm worker's)."""
    engine = InfluenceEngine.from_paths(data_root / "model", DataSpec(str(data_root / "train.jsonl")),
                                        artefact_dir=data_root / ".fastif" / "artefacts")
    engine.prepare()
    return engine


@pytest.fixture
def model(ctx, worker_engine, monkeypatch):
    record = ctx.models.create(ModelCreate(name="tiny", model_path="model", train_data={"path": "train.jsonl"}))
    monkeypatch.setitem(registry._engines, record.id, worker_engine)  # the worker has it loaded already
    assert engine_for(record, ctx.settings) is worker_engine
    ctx.models.set_ready(record.id, worker_engine.fingerprint, worker_engine.num_train, worker_engine.classifier.labels)
    return ctx.models.get(record.id)


@pytest.fixture(scope="module")
def reference_engine(data_root) -> InfluenceEngine:
    engine = InfluenceEngine.from_paths(data_root / "model", DataSpec(str(data_root / "train.jsonl")))
    engine.prepare()
    return engine


def averaged_reference(engine: InfluenceEngine, texts, shards: int, k: int, top: int, group: bool = False):
    """Averaging single-worker estimates seeded seed, seed+1, ...: what ``parallel`` promises."""
    plan = engine.plan([Query(t) for t in texts], group=group)
    estimates = [engine.solve(plan.vectors, LissaConfig(**{**LISSA, "seed": LISSA["seed"] + w})).vectors
                 for w in range(shards)]
    averaged = sum(estimates) / shards
    influences = engine.influences(plan, averaged, k, True, [False] * len(plan.keys))
    return averaged, estimates, result_items(engine, plan.encoded, influences, top)


class Transport:
    """What Celery would carry: the messages the shards send, delivered when the test says."""

    def __init__(self):
        self.sent: list[tuple[str, list]] = []

    def __call__(self, name: str, args: list) -> None:
        self.sent.append((name, list(args)))

    def take(self, name: str) -> list[int]:
        shards = [args[1] for n, args in self.sent if n == name]
        self.sent = [(n, a) for n, a in self.sent if n != name]
        return shards


def start(ctx, model, texts, shards: int, k: int = 12, top: int = 5, group: bool = False, **extra) -> tuple[str, Transport]:
    body = {"model_id": model.id, "inputs": [{"text": t} for t in texts], "k": k, "top": top, "lissa": LISSA,
            "parallel": shards, "group": group, **extra}  # extra may replace lissa
    job = ctx.jobs.create("influence", model.id, InfluenceRequest.model_validate(body).model_dump(mode="json"))
    assert ctx.jobs.start_delivery(job.id) == 1
    run = JobRun(job.id, ctx.jobs.request(job.id), 1, ctx, ProgressReporter(ctx.jobs, job.id))
    transport = Transport()
    parallel.start_parallel(run, InfluenceRequest.model_validate(run.request), transport)
    return job.id, transport


def assert_matches(items: list[dict], reference: list[dict]) -> None:
    assert len(items) == len(reference)
    for ours, theirs in zip(items, reference):
        assert ours["input_index"] == theirs["input_index"]
        for side in ("helpful", "harmful"):
            assert [e["train_index"] for e in ours[side]] == [e["train_index"] for e in theirs[side]]
            for a, b in zip(ours[side], theirs[side]):
                assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-9)
                assert a["knn_distance"] == pytest.approx(b["knn_distance"], rel=1e-5)


def run_to_the_end(ctx, job_id: str, transport: Transport, stest_order=None, score_order=None) -> None:
    shards = transport.take(parallel.STEST_SHARD)
    for shard in (stest_order or shards):
        assert parallel.stest_shard(job_id, shard, transport) == "done"
    scores = transport.take(parallel.SCORE_SHARD)
    assert sorted(scores) == sorted(shards)
    for shard in (score_order or scores):
        assert parallel.score_shard(job_id, shard) == "done"


@pytest.mark.parametrize(("texts", "shards", "group"), [
    (TEXTS[:1], 3, False),  # one input, three shards: the average is over the shards, not the inputs
    (TEXTS, 2, False),  # three inputs, two shards
    (TEXTS[:2], 3, True),  # a group: one row for two inputs
], ids=["1-input-3-shards", "3-inputs-2-shards", "group-of-2-3-shards"])
def test_parallel_job_equals_the_average_of_single_seed_estimates(ctx, model, reference_engine, texts, shards, group):
    began = time.perf_counter()
    job_id, transport = start(ctx, model, texts, shards, group=group)
    record = ctx.redis.hgetall(f"fastif:job:{job_id}")
    assert (record["shards"], record["stest_shards_done"], record["score_shards_done"]) == (str(shards), "0", "0")
    assert transport.sent == [(parallel.STEST_SHARD, [job_id, w]) for w in range(shards)]
    # The last shard to finish starts the scoring, whichever it is.
    run_to_the_end(ctx, job_id, transport, stest_order=list(reversed(range(shards))),
                   score_order=[1, 0] + list(range(2, shards)))
    job = ctx.jobs.get(job_id)
    assert job.status == "succeeded", job.error
    total, items = ctx.jobs.results(job_id, 0, 100)
    averaged, estimates, reference = averaged_reference(reference_engine, texts, shards, 12, 5, group)
    assert total == len(texts)
    assert_matches(items, reference)
    for item in items:
        assert item["diagnostics"]["shards"] == shards and item["diagnostics"]["solver"] == "lissa"
        assert set(item["diagnostics"]) == {"solver", "curvature", "shards", "converged", "lissa_converged",
                                            "s_test_norm", "cached", "seconds"}
        assert item["diagnostics"]["curvature"] == "hessian" and item["diagnostics"]["cached"] is False
        assert item["diagnostics"]["s_test_norm"] == pytest.approx(float(averaged[0 if group else item["input_index"]].norm()),
                                                                    rel=1e-5)
    record = ctx.redis.hgetall(f"fastif:job:{job_id}")
    assert (record["stest_shards_done"], record["score_shards_done"]) == (str(shards), str(shards))
    for w in range(shards):
        assert record[f"stest_{w}_attempts"] == "1" and record[f"score_{w}_attempts"] == "1"
        assert record[f"stest_{w}_worker"] == socket.gethostname() + ":?"
    # The whole result is cached for the same request, like a single worker's.
    from workers.influence import result_cache_key

    stored = ctx.redis.get(result_cache_key(model, InfluenceRequest.model_validate(ctx.jobs.request(job_id))))
    assert stored is not None and json.loads(stored) == items
    # The average is cached under the request's solver key plus the shard count; each shard's own
    # estimate under its own seed, as a single-worker request with that seed would find it.
    engine = engine_for(model, ctx.settings)
    cache = RedisTensorCache(ctx.redis_bytes, model.fingerprint, ctx.settings.cache_ttl_s,
                             ctx.settings.cache_max_bytes)
    request = InfluenceRequest.model_validate(ctx.jobs.request(job_id))
    plan = engine.plan(queries_of(request), group)
    for row, key in enumerate(plan.keys):
        stored = cache.get("s_test", {**key, **solver_config(request).cache_identity(), "parallel": shards})
        torch.testing.assert_close(stored, averaged[row].float(), rtol=1e-5, atol=1e-7)
        for w in range(shards):
            single = cache.get("s_test", {**key, **solver_config(request, seed_offset=w).cache_identity()})
            torch.testing.assert_close(single, estimates[w][row].float(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(estimates[0], estimates[1])  # the shards really are different estimates
    # The shard state expires with the results; the slowest scoring shard is the job's scoring time.
    state = list(ctx.redis.scan_iter(match=f"fastif:job:{job_id}:*"))
    assert len(state) >= 2 * shards + 4
    for key in state:
        assert 0 < ctx.redis.ttl(key) <= ctx.settings.result_ttl_s, key
    slowest = max(json.loads(ctx.redis.get(f"fastif:job:{job_id}:scores:{w}"))["seconds"] for w in range(shards))
    for item in items:
        assert item["diagnostics"]["seconds"]["scoring"] == pytest.approx(round(slowest, 4), abs=1e-4)
        assert 0 <= item["diagnostics"]["seconds"]["scoring"] < time.perf_counter() - began
        assert "gradients" in item["diagnostics"]["seconds"]


def test_the_done_sets_expire_with_the_results(ctx, model):
    """Every key of the shard state expires with the results (the done sets once had no TTL and stayed for good)."""
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    run_to_the_end(ctx, job_id, transport)
    assert ctx.jobs.get(job_id).status == "succeeded"
    for part in ("stest_done", "score_done"):
        assert 0 < ctx.redis.ttl(f"fastif:job:{job_id}:{part}") <= ctx.settings.result_ttl_s, part


def test_redelivered_shards_count_once_and_score_once(ctx, model, reference_engine):
    job_id, transport = start(ctx, model, TEXTS[:1], 3)
    transport.take(parallel.STEST_SHARD)
    for shard in (1, 1, 0):
        assert parallel.stest_shard(job_id, shard, transport) == "done"
    record = ctx.redis.hgetall(f"fastif:job:{job_id}")
    assert record["stest_shards_done"] == "2" and record["stest_1_attempts"] == "2"
    assert transport.sent == []  # two of three distinct shards: nobody starts the scoring yet
    assert parallel.stest_shard(job_id, 2, transport) == "done"
    assert transport.take(parallel.SCORE_SHARD) == [0, 1, 2]  # the scoring was started once
    assert parallel.stest_shard(job_id, 0, transport) == "done" and transport.sent == []  # a late copy of another
    # A late duplicate of the shard that averaged cannot know whether its first run sent the scoring shards
    # (its worker may have died first): it sends them again, and each counts once.
    assert parallel.stest_shard(job_id, 2, transport) == "done"
    assert transport.take(parallel.SCORE_SHARD) == [0, 1, 2]
    for shard in (2, 2, 0):
        assert parallel.score_shard(job_id, shard) == "done"
    job = ctx.jobs.get(job_id)
    assert job.status == "running"
    assert job.progress.stage == "scoring" and job.progress.done == job.progress.total  # the scoring shards report
    assert ctx.redis.hget(f"fastif:job:{job_id}", "score_shards_done") == "2"
    assert parallel.score_shard(job_id, 1) == "done"
    assert ctx.jobs.get(job_id).status == "succeeded"
    _, items = ctx.jobs.results(job_id, 0, 10)
    assert_matches(items, averaged_reference(reference_engine, TEXTS[:1], 3, 12, 5)[2])
    # Once the job is over, a shard delivered again does nothing.
    assert parallel.stest_shard(job_id, 0, transport) == "skipped"
    assert parallel.score_shard(job_id, 0) == "skipped"
    assert transport.sent == []


def test_a_merge_whose_worker_died_is_finished_by_the_same_shard_and_no_other(ctx, model, reference_engine, monkeypatch):
    merges = []
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    with monkeypatch.context() as patched:  # the merge's worker dies: the (patched) merge stores nothing
        patched.setattr(parallel, "_merge", lambda run, request, engine, plan, averaged: merges.append(run.job_id))
        run_to_the_end(ctx, job_id, transport)  # scoring shards 0 then 1: shard 1 wins the merge
        assert merges == [job_id] and ctx.jobs.get(job_id).status == "running"
        assert shards.phase_of(ctx, job_id) == "merge-1"
        assert parallel.score_shard(job_id, 0) == "done" and merges == [job_id]  # a late copy of the other shard
    assert parallel.score_shard(job_id, 1) == "done"  # its worker died in the merge: delivered again, it merges
    assert ctx.jobs.get(job_id).status == "succeeded"
    _, _, reference = averaged_reference(reference_engine, TEXTS[:1], 2, 12, 5)
    assert_matches(ctx.jobs.results(job_id, 0, 10)[1], reference)


def test_an_average_whose_worker_died_is_finished_by_the_same_shard(ctx, model, reference_engine, monkeypatch):
    job_id, transport = start(ctx, model, TEXTS[:1], 3)
    assert transport.take(parallel.STEST_SHARD) == [0, 1, 2]

    def worker_dies(*_args, **_kwargs):
        raise SystemExit("the worker died while averaging")

    with monkeypatch.context() as patched:
        patched.setattr(parallel, "_average", worker_dies)
        assert parallel.stest_shard(job_id, 2, transport) == "done"
        assert parallel.stest_shard(job_id, 0, transport) == "done"
        with pytest.raises(SystemExit):
            parallel.stest_shard(job_id, 1, transport)
    assert shards.phase_of(ctx, job_id) == "average-1" and transport.sent == []
    assert parallel.stest_shard(job_id, 0, transport) == "done" and transport.sent == []  # not its phase
    assert parallel.stest_shard(job_id, 1, transport) == "done"  # delivered again: it averages, sends the scoring
    assert sorted(transport.take(parallel.SCORE_SHARD)) == [0, 1, 2]
    for shard in (0, 1, 2):
        assert parallel.score_shard(job_id, shard) == "done"
    assert ctx.jobs.get(job_id).status == "succeeded"
    assert ctx.redis.hget(f"fastif:job:{job_id}", "score_shards_done") == "3"
    _, _, reference = averaged_reference(reference_engine, TEXTS[:1], 3, 12, 5)
    assert_matches(ctx.jobs.results(job_id, 0, 10)[1], reference)


@pytest.mark.parametrize(("lissa", "settled"), [({"damp": 0.3, "depth": 60}, True), ({"depth": 3}, False)],
                         ids=["settled", "too-short"])
def test_the_job_is_converged_when_every_shard_converged(ctx, model, reference_engine, lissa, settled):
    config = {**LISSA, **lissa}
    plan = reference_engine.plan([Query(TEXTS[0])])
    runs = [reference_engine.solve(plan.vectors, LissaConfig(**{**config, "seed": config["seed"] + w})) for w in range(2)]
    assert [r.converged for r in runs] == [settled, settled]
    job_id, transport = start(ctx, model, TEXTS[:1], 2, lissa=config)
    run_to_the_end(ctx, job_id, transport)
    _, items = ctx.jobs.results(job_id, 0, 10)
    assert items[0]["diagnostics"]["converged"] is settled and items[0]["diagnostics"]["lissa_converged"] is settled


def test_one_unsettled_shard_makes_the_job_unconverged_whichever_finishes_last(ctx, model, worker_engine, monkeypatch):
    original = worker_engine.cached_s_test

    def second_shard_unsettled(plan, solver, cache=None, on_progress=None, extra_key=None):
        s_tests, diagnostics, cached, factors = original(plan, solver, cache, on_progress, extra_key)
        return s_tests, {**diagnostics, "converged": solver.lissa.seed == LISSA["seed"]}, cached, factors

    monkeypatch.setattr(worker_engine, "cached_s_test", second_shard_unsettled)
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    run_to_the_end(ctx, job_id, transport, stest_order=[1, 0])
    _, items = ctx.jobs.results(job_id, 0, 10)
    assert items[0]["diagnostics"]["converged"] is False


def test_two_parallel_jobs_one_after_the_other_both_finish(ctx, model, reference_engine):
    for texts in (TEXTS[:1], TEXTS[1:2]):
        job_id, transport = start(ctx, model, texts, 2)
        run_to_the_end(ctx, job_id, transport)
        assert ctx.jobs.get(job_id).status == "succeeded"
        assert_matches(ctx.jobs.results(job_id, 0, 10)[1], averaged_reference(reference_engine, texts, 2, 12, 5)[2])


def test_a_redelivered_coordinator_sends_no_second_set_of_shards(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    run = JobRun(job_id, ctx.jobs.request(job_id), 2, ctx, ProgressReporter(ctx.jobs, job_id))
    parallel.start_parallel(run, InfluenceRequest.model_validate(run.request), transport)
    assert transport.take(parallel.STEST_SHARD) == [0, 1]


def test_a_coordinator_that_died_after_moving_the_phase_sends_the_shards_on_its_redelivery(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    ctx.redis.delete(shard_state(job_id, parallel.Phase.STEST, "sent"))  # as if it had died before sending
    transport.take(parallel.STEST_SHARD)
    run = JobRun(job_id, ctx.jobs.request(job_id), 2, ctx, ProgressReporter(ctx.jobs, job_id))
    parallel.start_parallel(run, InfluenceRequest.model_validate(run.request), transport)
    assert transport.take(parallel.STEST_SHARD) == [0, 1]


def test_a_shard_that_keeps_losing_its_worker_fails_the_job(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    assert shards.shard_guard(ctx, job_id, 0, "stest") and shards.shard_guard(ctx, job_id, 0, "stest")
    assert shards.shard_guard(ctx, job_id, 1, "stest") and shards.shard_guard(ctx, job_id, 0, "score")
    assert not shards.shard_guard(ctx, job_id, 0, "stest")  # a third start of shard 0 (max_deliveries 2)
    job = ctx.jobs.get(job_id)
    assert job.status == "failed" and job.error.code == "redelivery-limit"
    assert parallel.stest_shard(job_id, 1, transport) == "skipped"
    assert not shards.shard_guard(ctx, "no-such-job", 0, "stest")


def test_a_shard_of_a_deleted_model_fails_the_job_with_its_code(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    ctx.models.delete(model.id)
    assert parallel.stest_shard(job_id, 0, transport) == "failed"
    job = ctx.jobs.get(job_id)
    assert job.status == "failed" and job.error.code == "model-not-found"


def test_a_cancelled_job_stops_at_its_shard(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    ctx.jobs.request_cancel(job_id)
    assert parallel.stest_shard(job_id, 0, transport) == "cancelled"
    assert ctx.jobs.get(job_id).status == "cancelled"


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_slices_partition_the_candidates_in_order(shards):
    for count in range(0, 13):
        pieces = [parallel._slice(count, shards, w) for w in range(shards)]
        covered = [i for piece in pieces for i in range(count)[piece]]
        assert covered == list(range(count))
        sizes = [len(range(count)[piece]) for piece in pieces]
        assert max(sizes) - min(sizes) <= 1


def test_shard_seeds_are_the_request_seed_plus_the_shard():
    request = InfluenceRequest.model_validate({"model_id": "m", "inputs": [{"text": "x"}], "lissa": LISSA, "parallel": 3})
    for w in range(3):
        config = parallel.shard_seed_config(request, w)
        assert config.lissa.seed == LISSA["seed"] + w and config.lissa.depth == LISSA["depth"]
        assert config.lissa.damp == LISSA["damp"] and config.lissa.scale == LISSA["scale"]
    assert parallel.averaged_key(request) == {"parallel": 3}
    assert np.isclose(parallel.shard_seed_config(request, 0).lissa.damping, LISSA["damp"] * LISSA["scale"])


# -- the phases, and the merge through the path every job's results take ----------------------------------

def phase_of(ctx, job_id: str) -> str | None:
    return ctx.redis.get(f"fastif:job:{job_id}:phase")


def test_the_phases_move_forward_once_each_and_are_kept_in_the_shard_state(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    assert phase_of(ctx, job_id) == "stest"
    first, second = transport.take(parallel.STEST_SHARD)
    assert parallel.stest_shard(job_id, first, transport) == "done"
    assert phase_of(ctx, job_id) == "stest" and transport.sent == []
    assert parallel.stest_shard(job_id, second, transport) == "done"
    assert phase_of(ctx, job_id) == f"score-{second}"  # averaged by the last s_test shard, scoring shards sent
    # Each move happens once: nobody can take the job back to averaging or past the merge twice.
    assert not parallel.advance(ctx, job_id, parallel.Phase.STEST, parallel.Phase.AVERAGE)
    assert not parallel.advance(ctx, job_id, None, parallel.Phase.STEST)
    first, second = transport.take(parallel.SCORE_SHARD)
    averaged_by = phase_of(ctx, job_id)
    assert parallel.score_shard(job_id, first) == "done" and phase_of(ctx, job_id) == averaged_by
    assert parallel.score_shard(job_id, second) == "done" and phase_of(ctx, job_id) == f"merge-{second}"
    assert ctx.jobs.get(job_id).status == "succeeded"
    assert 0 < ctx.redis.ttl(f"fastif:job:{job_id}:phase") <= ctx.settings.result_ttl_s


def test_a_shard_of_a_job_without_shard_state_fails_it(ctx, model):
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    ctx.redis.delete(f"fastif:job:{job_id}:phase")
    assert parallel.stest_shard(job_id, 0, transport) == "failed"
    job = ctx.jobs.get(job_id)
    assert job.status == "failed" and job.error.code == "internal-error" and "shard state is gone" in job.error.message


def test_the_merge_stores_the_results_through_a_redis_outage_like_any_job(ctx, model, monkeypatch):
    """The single path's protection holds for the merge too: the outcome waits for Redis instead of being lost."""
    job_id, transport = start(ctx, model, TEXTS[:1], 2, output_path="merged.jsonl")
    real_succeed, calls = ctx.jobs.succeed, []

    def succeed_after_an_outage(job: str, items: list) -> bool:
        calls.append(job)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis is restarting")
        return real_succeed(job, items)

    monkeypatch.setattr(ctx.jobs, "succeed", succeed_after_an_outage)
    run_to_the_end(ctx, job_id, transport)
    assert calls == [job_id, job_id] and ctx.jobs.get(job_id).status == "succeeded"
    _, items = ctx.jobs.results(job_id, 0, 10)
    written = (ctx.settings.data_root / "merged.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in written] == items and len(items) == 1


def test_a_merged_item_that_drifts_from_the_contract_fails_the_job_before_anything_is_stored(ctx, model, monkeypatch):
    built = parallel.influence_items

    def with_a_field_the_contract_lacks(*args):
        return [{**item.model_dump(exclude_unset=True), "rank": 1} for item in built(*args)]

    monkeypatch.setattr(parallel, "influence_items", with_a_field_the_contract_lacks)
    job_id, transport = start(ctx, model, TEXTS[:1], 2)
    shards = transport.take(parallel.STEST_SHARD)
    for shard in shards:
        assert parallel.stest_shard(job_id, shard, transport) == "done"
    first, last = transport.take(parallel.SCORE_SHARD)
    assert parallel.score_shard(job_id, first) == "done"
    assert parallel.score_shard(job_id, last) == "failed"
    job = ctx.jobs.get(job_id)
    assert job.status == "failed" and job.error.code == "internal-error"
    assert job.error.message.startswith(f"score shard {last}: ContractDrift") and "item.rank" in job.error.message
    assert ctx.jobs.results(job_id, 0, 10) == (0, [])
    from workers.influence import result_cache_key

    assert ctx.redis.get(result_cache_key(model, InfluenceRequest.model_validate(ctx.jobs.request(job_id)))) is None
