"""The dataset half of ``batch``: one dataset job (``inputs_from``) through the real stack, on 1 and on 2 workers.

Each worker count gets a fresh stack (``fastif_cli.stack.start_stack``: embedded Redis,
single-process Celery workers of one torch thread), registers the bench model, warms every
worker up with a small dataset job of other inputs, then times one influence job over a file
of distinct packed inputs at the service's default configuration: inputs per second from the
job's own `started_at` to `finished_at`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from .common import Clock
from .data import Row, pack, read_rows, toy_rows
from .service import TERMINAL, ServiceBenchError, _start, _wait, make_data_root, register


@dataclass(frozen=True)
class DatasetConfig:
    inputs: int  # the timed job's inputs (FASTIF_BENCH_DATASET_INPUTS overrides)
    warm_inputs: int  # per worker, in the warm-up job
    shard_inputs: int
    k: int
    timeout_s: float


DEFAULT = DatasetConfig(inputs=10_000, warm_inputs=16, shard_inputs=128, k=1000, timeout_s=6 * 3600)
QUICK = DatasetConfig(inputs=96, warm_inputs=8, shard_inputs=16, k=60, timeout_s=600)


def dataset_rows(setup, count: int) -> tuple[list[Row], str]:
    """``count`` distinct inputs shaped like the bench's test inputs, and where they come from."""
    if setup.quick or setup.source is None:
        return toy_rows(count, seed=5, noise=0.0), "toy sentences"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    rows = pack(read_rows(setup.source), tokenizer, setup.sizes.tokens, count, seed=7)
    if len(rows) < count:
        raise ServiceBenchError(f"only {len(rows)} packed inputs from {setup.source}, {count} asked for")
    return rows, f"SST-2 train sentences packed into {setup.sizes.tokens}-token inputs (another shuffle than the training set's)"


def write_inputs(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in rows))


def run(setup, config: DatasetConfig | None = None, on_step=print) -> dict:
    """inputs per second of one dataset job on 1 and on 2 workers, and what each run recorded."""
    config = config or (QUICK if setup.quick else DEFAULT)
    inputs = int(os.environ.get("FASTIF_BENCH_DATASET_INPUTS", config.inputs))
    root = setup.workdir / "dataset-root"
    registration = make_data_root(setup, root)
    rows, source = dataset_rows(setup, inputs + 4 * config.warm_inputs)
    write_inputs(root / "inputs" / "timed.jsonl", rows[:inputs])
    env = {"FASTIF_DATA_ROOT": str(root), "REDIS_URL": ""}
    logs = Path(tempfile.mkdtemp(prefix="fastif-bench-dataset-logs-"))
    runs = {}
    for workers in (1, 2):
        warm = rows[inputs + 2 * config.warm_inputs * (workers - 1):][: config.warm_inputs * workers]
        write_inputs(root / "inputs" / f"warm-{workers}.jsonl", warm)
        on_step(f"dataset job: {workers} worker(s), {inputs} inputs")
        stack, url, _ = _start(workers, logs, env, threads=1)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                model, _ = register(client, registration, 3600)
                body = {"model_id": model["id"], "k": config.k, "top": 10}
                # One shard per worker first: each loads the model and its factors outside the timing.
                _finish(client, {**body, "inputs_from": {"path": f"inputs/warm-{workers}.jsonl", "text_field": "text",
                                                         "shard_inputs": config.warm_inputs}}, config.timeout_s)
                clock = Clock()
                job = _finish(client, {**body, "inputs_from": {"path": "inputs/timed.jsonl", "text_field": "text",
                                                               "shard_inputs": config.shard_inputs}}, config.timeout_s)
                seconds = _parse(job["finished_at"]) - _parse(job["started_at"])
                record = client.get(f"/v1/jobs/{job['id']}/results", params={"limit": 1}).json()
                runs[workers] = {"inputs": inputs, "seconds": seconds, "wall_seconds": clock.seconds,
                                 "inputs_per_s": inputs / seconds, "result_count": record["total"],
                                 "shards": -(-inputs // config.shard_inputs)}
        finally:
            stack.stop(grace_s=10)
    return {"config": {**config.__dict__, "inputs": inputs}, "source": source, "runs": runs,
            "dataset_inputs_per_s": runs[2]["inputs_per_s"],
            "dataset_speedup_2_vs_1_workers": runs[2]["inputs_per_s"] / runs[1]["inputs_per_s"]}


def _finish(client: httpx.Client, body: dict, timeout_s: float) -> dict:
    response = client.post("/v1/influence", json=body)
    if response.status_code != 202:
        raise ServiceBenchError(f"POST /v1/influence: HTTP {response.status_code}: {response.text[:300]}")
    job, _ = _wait(client, f"/v1/jobs/{response.json()['id']}", lambda j: j["status"] in TERMINAL, timeout_s, 0.5, 2.0)
    if job["status"] != "succeeded":
        raise ServiceBenchError(f"dataset job {job['id']} {job['status']}: {job.get('error')}")
    return job


def _parse(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
