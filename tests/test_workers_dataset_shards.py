"""A dataset job (workers/dataset.py) run task by task in this process, on the real Redis.

The shard messages the coordinator sends are kept by the test and delivered in the order it picks:
shards in any order and twice, a coordinator delivered again, a finisher whose worker died, a
file changed after it was checked, a cancel. Over real worker processes:
tests/test_integration_dataset_jobs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import datafiles
from api_schemas import InfluenceRequest, ModelCreate
from records.settings import settings_from
from tiny import make_tiny_bert, sentences, write_jsonl
from workers import build, dataset, registry, runner, shards
from workers.context import WorkerContext
from workers.influence import run_influence
from workers.results import ITEM_MODELS
from workers.runner import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset-shards-root")
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(60, seed=2, noise=0.1))
    write_jsonl(root / "dev.jsonl", sentences(10, seed=5))
    return root


@pytest.fixture
def ctx(redis_client, redis_url, data_root, tmp_path, monkeypatch) -> WorkerContext:
    settings = settings_from(redis_url=redis_url, data_root=data_root, state_dir=tmp_path / "state")
    context = WorkerContext(settings)
    for module in (shards, runner, dataset):
        monkeypatch.setattr(module, "context", lambda: context)
    monkeypatch.setattr(registry, "_engines", {})
    return context


@pytest.fixture
def model_id(ctx) -> str:
    create = ModelCreate(name="tiny", model_path="model", train_data={"path": "train.jsonl"})
    model = ctx.models.create(create)
    job = ctx.jobs.create("build_model", model.id, create.model_dump(mode="json"))
    ctx.models.set_build_job(model.id, job.id)
    assert run_job(job.id, lambda run: build.run_build(run, model.id, lambda *_: pytest.fail("one shard: in place")),
                   ITEM_MODELS["build_model"]) == "succeeded"
    return model.id


class Transport:
    def __init__(self):
        self.sent: list[int] = []

    def __call__(self, name: str, args: list) -> None:
        assert name == dataset.DATASET_SHARD
        self.sent.append(args[1])

    def take(self) -> list[int]:
        taken, self.sent = self.sent, []
        return taken


def submit(ctx, data_root: Path, model_id: str, **source) -> str:
    """A dataset job as the API records it: the file pinned by its sha256, its rows counted."""
    path = data_root / "dev.jsonl"
    request = InfluenceRequest(model_id=model_id, k=10, top=2,
                               inputs_from={"path": "dev.jsonl", "shard_inputs": 4, "sha256": datafiles.content_sha256(path),
                                            **source})
    return ctx.jobs.create("influence", model_id, request.model_dump(mode="json"), inputs_total=10).id


def coordinate(job_id: str, transport: Transport) -> str:
    return run_job(job_id, lambda run: run_influence(run, transport), ITEM_MODELS["influence"])


def test_shards_in_any_order_and_twice_finish_the_job_once_with_every_input_in_order(ctx, data_root, model_id):
    job_id, transport = submit(ctx, data_root, model_id), Transport()
    assert coordinate(job_id, transport) == "handed-on"
    assert transport.take() == [0, 1, 2]  # 4 + 4 + 2
    assert coordinate(job_id, transport) == "handed-on"  # delivered again: the split stands, nothing is sent twice
    assert transport.take() == [] and ctx.jobs.shard_count(job_id) == 3
    assert dataset.dataset_shard(job_id, 2, transport) == "done"
    assert ctx.jobs.results(job_id)[0] == 0  # shard 0 missing: nothing readable yet
    assert [dataset.dataset_shard(job_id, s, transport) for s in (0, 0)] == ["done", "done"]  # a shard delivered twice
    job = ctx.jobs.require(job_id)
    assert (job.status, job.result_count, job.progress.done) == ("running", 6, 6)
    assert [i["input_index"] for i in ctx.jobs.results(job_id, 0, 100)[1]] == [0, 1, 2, 3]
    assert dataset.dataset_shard(job_id, 1, transport) == "done"  # the last: it finishes the job
    job = ctx.jobs.require(job_id)
    assert (job.status, job.result_count) == ("succeeded", 10)
    assert [i["input_index"] for i in ctx.jobs.results(job_id, 0, 100)[1]] == list(range(10))
    assert not ctx.redis.keys(f"fastif:job:{job_id}:inputs:*")  # the inputs let go
    assert dataset.dataset_shard(job_id, 1, transport) == "skipped"


def test_a_coordinator_that_died_while_sending_sends_the_rest_on_its_redelivery(ctx, data_root, model_id, monkeypatch):
    job_id, transport = submit(ctx, data_root, model_id), Transport()

    def dies_after_the_first(name: str, args: list) -> None:
        if transport.sent:
            raise SystemExit("the worker dies while sending")
        transport(name, args)

    with pytest.raises(SystemExit):
        dataset.start_dataset(runner.JobRun(job_id, ctx.jobs.request(job_id), 1, ctx,
                                            runner.ProgressReporter(ctx.jobs, job_id)),
                              model_id, InfluenceRequest.model_validate(ctx.jobs.request(job_id)).inputs_from,
                              dies_after_the_first)
    assert transport.take() == [0]
    assert coordinate(job_id, transport) == "handed-on" and transport.take() == [1, 2]  # the rest, once
    assert [dataset.dataset_shard(job_id, s, transport) for s in (0, 1, 2)] == ["done"] * 3
    assert ctx.jobs.require(job_id).status == "succeeded"


def test_a_finisher_whose_worker_died_finishes_on_its_redelivery(ctx, data_root, model_id, monkeypatch):
    job_id, transport = submit(ctx, data_root, model_id), Transport()
    coordinate(job_id, transport)
    assert [dataset.dataset_shard(job_id, s, transport) for s in (0, 1)] == ["done", "done"]
    real_finish = dataset._finish
    monkeypatch.setattr(dataset, "_finish", lambda run: (_ for _ in ()).throw(SystemExit("worker died")))
    with pytest.raises(SystemExit):
        dataset.dataset_shard(job_id, 2, transport)
    monkeypatch.setattr(dataset, "_finish", real_finish)
    assert ctx.jobs.require(job_id).status == "running"
    assert dataset.dataset_shard(job_id, 0, transport) == "done"  # another shard's late copy: not its phase, nothing to do
    assert ctx.jobs.require(job_id).status == "running"
    assert dataset.dataset_shard(job_id, 2, transport) == "done"  # the finisher's own redelivery
    assert ctx.jobs.require(job_id).status == "succeeded"


def test_a_file_changed_after_it_was_checked_fails_the_job(ctx, data_root, model_id, tmp_path):
    job_id = submit(ctx, data_root, model_id)
    original = (data_root / "dev.jsonl").read_text()
    try:
        (data_root / "dev.jsonl").write_text(original + json.dumps({"text": "one more", "label": "positive"}) + "\n")
        assert coordinate(job_id, Transport()) == "failed"
    finally:
        (data_root / "dev.jsonl").write_text(original)
    assert ctx.jobs.require(job_id).error.code == "inputs-changed"


def test_a_cancel_stops_the_shards_keeps_what_finished_and_lets_the_inputs_go(ctx, data_root, model_id):
    job_id, transport = submit(ctx, data_root, model_id), Transport()
    coordinate(job_id, transport)
    assert dataset.dataset_shard(job_id, 1, transport) == "done"
    ctx.jobs.request_cancel(job_id)
    assert dataset.dataset_shard(job_id, 0, transport) == "cancelled"
    assert dataset.dataset_shard(job_id, 2, transport) == "skipped"
    job = ctx.jobs.require(job_id)
    assert (job.status, job.result_count) == ("cancelled", 4)
    assert [i["input_index"] for i in ctx.jobs.results(job_id, 0, 100)[1]] == [4, 5, 6, 7]
    assert not ctx.redis.keys(f"fastif:job:{job_id}:inputs:*")


def test_shards_go_in_lanes_each_sending_the_next_so_other_jobs_queue_between_them(ctx, data_root, model_id,
                                                                                     monkeypatch):
    monkeypatch.setattr(ctx.settings, "dataset_shards_in_flight", 2)
    job_id, transport = submit(ctx, data_root, model_id, shard_inputs=2), Transport()  # 5 shards in 2 lanes
    assert coordinate(job_id, transport) == "handed-on" and transport.take() == [0, 1]
    monkeypatch.setattr(ctx.settings, "dataset_shards_in_flight", 4)  # a worker configured otherwise: the job's stands
    assert dataset.dataset_shard(job_id, 1, transport) == "done" and transport.take() == [3]
    assert dataset.dataset_shard(job_id, 0, transport) == "done" and transport.take() == [2]
    assert dataset.dataset_shard(job_id, 0, transport) == "done" and transport.take() == []  # delivered again
    assert dataset.dataset_shard(job_id, 3, transport) == "done" and transport.take() == []  # its lane's last
    assert coordinate(job_id, transport) == "handed-on" and transport.take() == []
    assert dataset.dataset_shard(job_id, 2, transport) == "done" and transport.take() == [4]
    assert ctx.jobs.require(job_id).status == "running"
    assert dataset.dataset_shard(job_id, 4, transport) == "done"
    job = ctx.jobs.require(job_id)
    assert (job.status, job.result_count) == ("succeeded", 10)
    assert [i["input_index"] for i in ctx.jobs.results(job_id, 0, 100)[1]] == list(range(10))


def test_a_cancelled_job_sends_no_more_of_its_shards(ctx, data_root, model_id, monkeypatch):
    monkeypatch.setattr(ctx.settings, "dataset_shards_in_flight", 1)
    job_id, transport = submit(ctx, data_root, model_id, shard_inputs=4), Transport()
    assert coordinate(job_id, transport) == "handed-on" and transport.take() == [0]
    ctx.jobs.request_cancel(job_id)
    assert dataset.dataset_shard(job_id, 0, transport) == "cancelled" and transport.take() == []
    assert ctx.jobs.require(job_id).status == "cancelled"
