"""The build job (workers/build.py) puts the index it built and its measured recall on the model record,
as GET /v1/models/{id} shows it. Run in this process on the real Redis, with a tiny model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from api_schemas import ModelCreate
from records.settings import settings_from
from tiny import make_tiny_bert, sentences, write_jsonl
from workers import registry
from workers.build import run_build
from workers.context import WorkerContext

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_TRAIN = 40


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build-root")
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(NUM_TRAIN, seed=2, noise=0.1))
    return root


@pytest.fixture
def ctx(redis_client, redis_url, data_root, monkeypatch) -> WorkerContext:
    monkeypatch.setattr(registry, "_engines", {})  # the engines this test's builds load stay its own
    return WorkerContext(settings_from(redis_url=redis_url, data_root=data_root))


def build(ctx: WorkerContext, **index) -> dict:
    record = ctx.models.create(ModelCreate(name="tiny", model_path="model", train_data={"path": "train.jsonl"},
                                           index=index))
    run = SimpleNamespace(ctx=ctx, job_id=f"build-{record.id}", progress=lambda *_args, **_kwargs: None)
    # 40 examples make one shard of the default 1,024: written in this task, with no shard task sent.
    run_build(run, record.id, send=lambda name, args: pytest.fail(f"sent {name} {args}"))
    model = ctx.models.get(record.id)
    assert model.status == "ready"
    return model.model_dump(mode="json")


def test_the_default_build_reports_an_exact_flat_index(ctx):
    model = build(ctx)
    assert model["request"]["index"]["kind"] == "auto"
    assert model["index"] == {"kind": "flat", "nlist": None, "nprobe": None, "recall_at_1000": 1.0, "queries": 0}


def test_an_approximate_index_is_reported_with_its_measured_recall(ctx):
    model = build(ctx, kind="hnsw", space="feature")
    index = model["index"]
    assert (index["kind"], index["nlist"], index["nprobe"], index["queries"]) == ("hnsw", None, None, NUM_TRAIN)
    assert index["recall_at_1000"] == 1.0  # k = N = 40: every example is a neighbour
