"""A registration built in shards by two real worker processes, also when one of them is killed mid-shard.

What the workers write must equal, to the bit, what one process's ``prepare()`` writes: features,
gradient keys, prefix activations and the faiss index; and the curvature they measure in parts (the
spectrum, EK-FAC's bases and the parts of its second pass) what one process measures.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from fastif import DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec
from live_stack import live_stack, wait_for  # noqa: F401  (fixture)
from fastif.curvature import EIGENVALUE_PARTS
from tiny import assert_same_build, assert_same_curvature, make_tiny_bert, sentences, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def wide_model(live_stack) -> tuple[str, str]:  # noqa: F811
    """A model and data slow enough to encode (about half a second per shard) that a kill lands mid-shard."""
    root = live_stack.data_root
    make_tiny_bert(root / "wide", seed=3, layers=4, hidden=256, heads=4, intermediate=1024, initializer_range=0.3)
    rng = random.Random(8)
    rows = sentences(3072, seed=9)
    for row in rows:  # about 40 tokens each
        row["text"] = " ".join([row["text"], *(r["text"] for r in rng.sample(rows, 1))])
    write_jsonl(root / "long.jsonl", rows)
    write_jsonl(root / "long-1k.jsonl", rows[:1024])
    return "wide", "long.jsonl"


def stored(data_root: Path, model: dict) -> InfluenceEngine:
    """What the workers left on the state volume, as a process that never built it loads it."""
    engine = engine_of(data_root, model, data_root / ".fastif" / "artefacts")
    assert engine.fingerprint == model["fingerprint"] and engine.built()
    engine.prepare()
    return engine


def engine_of(data_root: Path, model: dict, artefacts: Path) -> InfluenceEngine:
    request = model["request"]
    index, params = request["index"], request["influence"]["params"]
    return InfluenceEngine.from_paths(data_root / request["model_path"], DataSpec(str(data_root / request["train_data"]["path"])),
                                      InfluenceSpec(params=params if params == "auto" else tuple(params)),
                                      IndexConfig(prefix=index["prefix"], prefix_dtype=index["prefix_dtype"],
                                                  shard_examples=index["shard_examples"]),
                                      artefact_dir=artefacts, device="cpu")


def one_process_build(data_root: Path, model: dict, tmp_path: Path) -> InfluenceEngine:
    engine = engine_of(data_root, model, tmp_path)
    engine.prepare()
    return engine


def shard_records(live_stack, job_id: str, task: str = "build") -> dict[int, dict]:  # noqa: F811
    """What the job record says of each shard of ``task`` ("build", "eigenvalues"): its worker, its attempts."""
    record = live_stack.redis.hgetall(f"fastif:job:{job_id}")
    shards: dict[int, dict] = {}
    for key, value in record.items():
        part = key.split("_")
        if part[0] == task and len(part) == 3:
            shards.setdefault(int(part[1]), {})[part[2]] = value
    return shards


def test_two_workers_build_in_shards_what_one_process_builds(live_stack, wide_model, tmp_path):  # noqa: F811
    # Shards that take about a second each: shards of a few milliseconds could all go to the worker that
    # was idle while the other still ran the build task that sent them.
    model = live_stack.register(name="sharded", model_path=wide_model[0], train="long-1k.jsonl",
                                index={"shard_examples": 256})  # 1,024 examples: 4 shards
    assert model["status"] == "ready", model["error"]
    assert model["examples_encoded"] == model["num_train"] == 1024
    shards = shard_records(live_stack, model["build_job_id"])
    assert sorted(shards) == [0, 1, 2, 3]
    assert {s["worker"].split(":", 1)[1].split("@")[0] for s in shards.values()} == {"worker0", "worker1"}
    assert sorted(shard_records(live_stack, model["build_job_id"], "eigenvalues")) == list(range(EIGENVALUE_PARTS))
    workers, one_process = stored(live_stack.data_root, model), one_process_build(live_stack.data_root, model, tmp_path)
    assert_same_build(workers, one_process)
    assert_same_curvature(workers, one_process)
    assert not list(workers.artefact_dir.glob("ekfac-*"))  # the fit's steps, combined into its factors


def pool_children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_worker_killed_mid_shard_leaves_the_build_whole(live_stack, wide_model, tmp_path):  # noqa: F811
    model_path, train = wide_model
    body = {"name": "killed", "model_path": model_path, "train_data": {"path": train},
            "index": {"shard_examples": 384, "prefix_dtype": "float16"},  # 8 shards
            # Influence on the head only: the curvature fitted after the shards costs little.
            "influence": {"params": ["classifier"]}}
    response = live_stack.client.post("/v1/models", json=body)
    assert response.status_code == 202, response.text
    model_id = response.json()["id"]
    job_id = live_stack.client.get(f"/v1/models/{model_id}").json()["build_job_id"]
    started = wait_for(lambda: shard_records(live_stack, job_id), lambda s: any("worker" in r for r in s.values()),
                       timeout_s=120, interval_s=0.01)
    victim_name = next(r["worker"] for r in started.values() if "worker" in r).split(":", 1)[1].split("@")[0]
    victim = live_stack.worker_pids()[int(victim_name.removeprefix("worker"))]
    for child in pool_children(victim):
        os.kill(child, signal.SIGKILL)
    model = wait_for(lambda: live_stack.client.get(f"/v1/models/{model_id}").json(),
                     lambda m: m["status"] != "building", timeout_s=300)
    assert model["status"] == "ready", model["error"]
    attempts = {shard: int(r.get("attempts", 0)) for shard, r in shard_records(live_stack, job_id).items()}
    assert sorted(attempts) == list(range(8)) and 2 in attempts.values(), attempts  # the killed shard ran again
    assert_same_build(stored(live_stack.data_root, model), one_process_build(live_stack.data_root, model, tmp_path))
