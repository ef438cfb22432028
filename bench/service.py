"""``service``: the real stack over HTTP on loopback — Redis, Celery worker processes and the API.

Measures, against ``fastif_cli.stack.start_stack``:
- cold query latency (the first query on a fresh worker, which loads the model; then new inputs),
  and cached latency (the same request again: answered from the Redis result cache);
- job throughput with 1 and with 2 worker processes: a batch of inputs sent as separate jobs at once;
- status-poll latency (``GET /v1/jobs/{id}``) p50/p99 under a load generator: ``wrk`` when installed,
  else an asyncio httpx client with bounded concurrency; with the workers idle, and while a job runs.

Latency of a job is from its POST to the first poll that reads a terminal status (polling every few ms).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from fastif_cli.stack import free_port, start_stack

from .common import Clock, bars, headline_block, setup_block, table, write_results
from .speed import best_from_stest

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class ServiceConfig:
    k: int
    lissa: dict  # fallback when stest.json is absent
    fastif_lissa: dict  # one cold query at FastIF's default configuration
    cold_inputs: int
    cached_requests: int
    throughput_jobs: int
    throughput_rounds: int
    poll_seconds: int
    poll_connections: int
    build_timeout_s: float


DEFAULT = ServiceConfig(k=1000, lissa={"depth": 100, "batch_size": 4}, fastif_lissa={"depth": 1000, "batch_size": 1},
                        cold_inputs=3, cached_requests=100, throughput_jobs=12, throughput_rounds=3, poll_seconds=10, poll_connections=16,
                        build_timeout_s=1800)
QUICK = ServiceConfig(k=60, lissa={"depth": 20, "batch_size": 4}, fastif_lissa={"depth": 100, "batch_size": 1},
                      cold_inputs=2, cached_requests=10, throughput_jobs=4, throughput_rounds=2, poll_seconds=2, poll_connections=8,
                      build_timeout_s=300)


class ServiceBenchError(RuntimeError):
    pass


# -- the data root --------------------------------------------------------------------------------
def _copy_if_changed(source: Path, target: Path) -> None:
    """A plain copy (links followed: the data root holds no symlinks); skipped when already identical in size."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            if child.is_file():
                _copy_if_changed(child, target / child.name)
        return
    if target.is_file() and target.stat().st_size == source.stat().st_size and target.stat().st_mtime >= source.stat().st_mtime:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def make_data_root(setup, root: Path) -> dict:
    _copy_if_changed(setup.model_dir, root / "models" / "bench-model")
    _copy_if_changed(setup.train_path, root / "data" / "train.tsv")
    return {"name": "bench-model", "model_path": "models/bench-model",
            "train_data": {"path": "data/train.tsv", "text_field": "sentence", "label_field": "label", "quoting": "none"},
            "influence": {"params": "auto", "weight_decay": 0.0, "max_length": setup.max_length}}


# -- HTTP helpers -----------------------------------------------------------------------------------
def _wait(client: httpx.Client, path: str, done, timeout_s: float, interval_s: float = 0.005,
          max_interval_s: float = 0.1) -> tuple[dict, float]:
    """Poll until ``done``: every 5 ms at first, backing off to ``max_interval_s`` (about a tenth of the time waited),
    so that the client's own polling does not load the two cores that the worker computes on."""
    clock = Clock()
    while True:
        value = client.get(path).json()
        if done(value):
            return value, clock.seconds
        if clock.seconds > timeout_s:
            raise ServiceBenchError(f"timed out after {timeout_s:.0f} s waiting on {path}: {value}")
        time.sleep(interval_s)
        interval_s = min(max(interval_s, 0.1 * clock.seconds), max_interval_s)


def register(client: httpx.Client, body: dict, timeout_s: float, max_poll_s: float = 0.1) -> tuple[dict, float]:
    """The model registered and ready, and the seconds to it as polled (every ``max_poll_s`` at most)."""
    clock = Clock()
    response = client.post("/v1/models", json=body)
    if response.status_code != 202:
        raise ServiceBenchError(f"registering the model: HTTP {response.status_code}: {response.text[:300]}")
    model_id = response.json()["id"]
    model, _ = _wait(client, f"/v1/models/{model_id}", lambda m: m["status"] != "building", timeout_s, 0.5, max_poll_s)
    if model["status"] != "ready":
        raise ServiceBenchError(f"the model build failed: {model.get('error')}")
    return model, clock.seconds


def submit(client: httpx.Client, body: dict) -> str:
    response = client.post("/v1/influence", json=body)
    if response.status_code != 202:
        raise ServiceBenchError(f"POST /v1/influence: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()["id"]


def query_latency(client: httpx.Client, body: dict, timeout_s: float = 900) -> tuple[float, dict]:
    """Seconds from POST to a terminal status read by polling; the job's record."""
    clock = Clock()
    job_id = submit(client, body)
    job, _ = _wait(client, f"/v1/jobs/{job_id}", lambda j: j["status"] in TERMINAL, timeout_s)
    if job["status"] != "succeeded":
        raise ServiceBenchError(f"job {job_id} {job['status']}: {job.get('error')}")
    return clock.seconds, job


def throughput(client: httpx.Client, bodies: list[dict], timeout_s: float = 1800) -> dict:
    """All jobs submitted at once; jobs per second until the last one succeeds."""
    clock = Clock()
    ids = [submit(client, body) for body in bodies]
    pending = list(ids)
    while pending:  # one status read per 100 ms: the oldest unfinished job
        job = client.get(f"/v1/jobs/{pending[0]}").json()
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise ServiceBenchError(f"job {pending[0]} {job['status']}: {job.get('error')}")
            pending.pop(0)
            continue
        if clock.seconds > timeout_s:
            raise ServiceBenchError(f"throughput jobs not done after {timeout_s:.0f} s")
        time.sleep(0.1)
    seconds = clock.seconds
    return {"jobs": len(ids), "seconds": seconds, "jobs_per_s": len(ids) / seconds}


def best_throughput(client: httpx.Client, config: ServiceConfig, next_body) -> dict:
    """The best of ``throughput_rounds`` batches of fresh inputs: a core taken by another process for a
    while slows one round, not the figure (every round is kept in ``rounds``)."""
    rounds = [throughput(client, [next_body() for _ in range(config.throughput_jobs)])
              for _ in range(config.throughput_rounds)]
    best = max(rounds, key=lambda r: r["jobs_per_s"])
    return {**best, "rounds_jobs_per_s": [r["jobs_per_s"] for r in rounds]}


# -- the load generator -----------------------------------------------------------------------------
def _wrk_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def poll_load(url: str, seconds: int, connections: int) -> dict:
    """Hammer one status URL for ``seconds``: p50/p99 latency and requests per second."""
    wrk = shutil.which("wrk")
    if wrk:
        done = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url], capture_output=True,
                              text=True, timeout=seconds + 60)
        text = done.stdout
        percentiles = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text, re.M))
        rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if "50" not in percentiles or "99" not in percentiles or rps is None:
            raise ServiceBenchError(f"could not read wrk's output: {text[-500:]} {done.stderr[-300:]}")
        return {"tool": f"wrk (1 thread, {connections} connections, {seconds} s)", "p50_ms": _wrk_ms(percentiles["50"]),
                "p99_ms": _wrk_ms(percentiles["99"]), "requests_per_s": float(rps.group(1)),
                "non_2xx": int(errors.group(1)) if errors else 0}
    return asyncio.run(_httpx_load(url, seconds, connections))


async def _httpx_load(url: str, seconds: int, connections: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            response = await client.get(url)
            latencies.append((time.perf_counter() - start) * 1000)
            errors += response.status_code >= 300

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(connections)))
    return {"tool": f"httpx asyncio ({connections} concurrent, {seconds} s)", "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "requests_per_s": len(latencies) / seconds, "non_2xx": errors}


# -- the suite ----------------------------------------------------------------------------------------
def run(setup, out: Path, config: ServiceConfig | None = None) -> dict:
    config = config or (QUICK if setup.quick else DEFAULT)
    clock = Clock()
    best, best_note = best_from_stest(out, _lissa(config.lissa))
    lissa = {"damp": best.damp, "scale": best.scale, "depth": best.depth, "batch_size": best.batch_size,
             "repeats": best.repeats, "seed": 0}
    root = setup.workdir / "service-root"
    registration = make_data_root(setup, root)
    texts = [r.text for r in setup.test_rows]
    used = iter(range(len(texts)))

    def body(text: str, **extra) -> dict:
        return {"model_id": model_id, "inputs": [{"text": text}], "k": config.k, "top": 10, "lissa": lissa, **extra}

    results: dict = {"lissa": lissa, "best_note": best_note}
    logs = Path(tempfile.mkdtemp(prefix="fastif-bench-logs-"))
    env = {"FASTIF_DATA_ROOT": str(root), "REDIS_URL": ""}
    with bars() as progress:
        # ---- one worker, one torch thread: latency, polling, throughput -------------------------
        task = progress.add_task("1 worker: start, register, build", total=None)
        stack, url, _ = _start(1, logs, env, threads=1)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                model, build_seconds = register(client, registration, config.build_timeout_s)
                model_id = model["id"]
                results["build_seconds_1_worker"] = build_seconds
                progress.update(task, total=1, completed=1)

                task = progress.add_task("cold and cached queries", total=2 + config.cold_inputs + config.cached_requests)
                first, _ = query_latency(client, body(texts[next(used)]))
                progress.advance(task)
                cold = []
                for _ in range(config.cold_inputs):
                    cold.append(query_latency(client, body(texts[next(used)]))[0])
                    progress.advance(task)
                fastif_text = texts[next(used)]
                fastif_cold, _ = query_latency(client, {**body(fastif_text), "lissa": {**lissa, **config.fastif_lissa}})
                progress.advance(task)
                cached_body = body(texts[0])  # the first query: its result is in Redis now
                cached = []
                for _ in range(config.cached_requests):
                    seconds, job = query_latency(client, cached_body)
                    cached.append(seconds)
                    progress.advance(task)
                item = client.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]
                if not item["diagnostics"]["cached"]:
                    raise ServiceBenchError("the repeated request was not answered from the cache")
                results["latency"] = {
                    "first_query_fresh_worker_s": first, "cold_s": cold, "cold_median_s": statistics.median(cold),
                    "cold_fastif_config_s": fastif_cold, "cached_ms": [s * 1000 for s in cached],
                    "cached_p50_ms": float(np.percentile(cached, 50) * 1000),
                    "cached_p95_ms": float(np.percentile(cached, 95) * 1000),
                    "cached_p99_ms": float(np.percentile(cached, 99) * 1000)}

                task = progress.add_task("status polls under load (idle workers)", total=None)
                status_url = f"{url}/v1/jobs/{job['id']}"
                results["poll_idle"] = poll_load(status_url, config.poll_seconds, config.poll_connections)
                progress.update(task, total=1, completed=1)
                task = progress.add_task("status polls under load (a job running)", total=None)
                busy_id = submit(client, {**body(texts[next(used)]), "lissa": {**lissa, **config.fastif_lissa}})
                _wait(client, f"/v1/jobs/{busy_id}", lambda j: j["status"] != "queued", 120)
                results["poll_busy"] = poll_load(f"{url}/v1/jobs/{busy_id}", config.poll_seconds, config.poll_connections)
                busy_job = client.get(f"/v1/jobs/{busy_id}").json()
                results["poll_busy"]["job_still_running_at_end"] = busy_job["status"] == "running"
                client.post(f"/v1/jobs/{busy_id}/cancel")  # free the worker for the throughput run
                _wait(client, f"/v1/jobs/{busy_id}", lambda j: j["status"] in TERMINAL, 900, 0.2)
                progress.update(task, total=1, completed=1)

                task = progress.add_task(f"throughput, 1 worker, {config.throughput_rounds} × {config.throughput_jobs} jobs",
                                         total=None)
                results["throughput_1"] = best_throughput(client, config, lambda: body(texts[next(used)]))
                progress.update(task, total=1, completed=1)
        finally:
            stack.stop(grace_s=10)

        # ---- two workers of one thread each; then one worker with both threads ------------------
        for workers, threads, name in ((2, 1, "throughput_2"), (1, 2, "throughput_1_two_threads")):
            task = progress.add_task(f"{workers} worker(s) × {threads} thread(s): start, register, warm up", total=None)
            stack, url, _ = _start(workers, logs, env, threads=threads)
            try:
                with httpx.Client(base_url=url, timeout=60) as client:
                    model, build_seconds = register(client, registration, config.build_timeout_s)
                    model_id = model["id"]
                    results[f"build_seconds_{name}"] = build_seconds
                    throughput(client, [body(texts[next(used)]) for _ in range(2 * workers)])  # every worker loads the model
                    progress.update(task, total=1, completed=1)
                    task = progress.add_task(f"throughput, {workers} worker(s) × {threads} thread(s), "
                                             f"{config.throughput_rounds} × {config.throughput_jobs} jobs", total=None)
                    results[name] = best_throughput(client, config, lambda: body(texts[next(used)]))
                    progress.update(task, total=1, completed=1)
            finally:
                stack.stop(grace_s=10)
    shutil.rmtree(logs, ignore_errors=True)

    ratio = results["throughput_2"]["jobs_per_s"] / results["throughput_1"]["jobs_per_s"]
    headline = {"cached_p50_ms": round(results["latency"]["cached_p50_ms"], 1),
                "throughput_ratio_2_vs_1_workers": round(ratio, 3),
                "poll_p99_ms": round(results["poll_idle"]["p99_ms"], 2)}
    data = {"config": asdict(config), "num_train": setup.num_train, **results, "suite_seconds": clock.seconds}
    write_results(out, "service", headline, data, _markdown(setup, config, headline, data))
    return headline


def _lissa(values: dict):
    from fastif import LissaConfig

    return LissaConfig(**values)


def _start(workers: int, logs: Path, env: dict, threads: int):
    try:
        return start_stack("127.0.0.1", free_port(), workers=workers, log_dir=logs, extra_env=env, threads_per_worker=threads)
    except RuntimeError as err:
        tails = []
        for path in sorted(logs.glob("*.log")):
            tails.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
        raise ServiceBenchError(f"the stack did not start with {workers} worker(s): {err}\n" + "\n".join(tails)) from None


def _rates(result: dict) -> str:
    return ", ".join(f"{r:.2f}" for r in result["rounds_jobs_per_s"])


def _markdown(setup, config, headline, data) -> str:
    lat, l = data["latency"], data["lissa"]
    t1, t2, t1x2 = data["throughput_1"], data["throughput_2"], data["throughput_1_two_threads"]
    pi, pb = data["poll_idle"], data["poll_busy"]
    rows = [
        ("first query on a fresh worker (loads the model)", lat["first_query_fresh_worker_s"] * 1000),
        (f"cold query, new input (median of {len(lat['cold_s'])})", lat["cold_median_s"] * 1000),
        (f"cold query at FastIF's configuration (J={config.fastif_lissa['depth']}, B={config.fastif_lissa['batch_size']})",
         lat["cold_fastif_config_s"] * 1000),
        (f"cached: the same request again, p50 of {len(lat['cached_ms'])}", lat["cached_p50_ms"]),
        ("cached: p95", lat["cached_p95_ms"]),
        ("cached: p99", lat["cached_p99_ms"]),
    ]
    thr = [("1 worker, 1 torch thread", t1["jobs"], t1["seconds"], t1["jobs_per_s"], 1.0),
           ("2 workers, 1 torch thread each", t2["jobs"], t2["seconds"], t2["jobs_per_s"], t2["jobs_per_s"] / t1["jobs_per_s"]),
           ("1 worker, 2 torch threads", t1x2["jobs"], t1x2["seconds"], t1x2["jobs_per_s"],
            t1x2["jobs_per_s"] / t1["jobs_per_s"])]
    polls = [("workers idle", pi["p50_ms"], pi["p99_ms"], pi["requests_per_s"], pi["non_2xx"]),
             ("a job running on the worker", pb["p50_ms"], pb["p99_ms"], pb["requests_per_s"], pb["non_2xx"])]
    return f"""# service: the real stack over HTTP on loopback

{headline_block(headline)}

(`cached_p50_ms`: POST of a repeated request to the poll that reads `succeeded`; `throughput_ratio_2_vs_1_workers`:
jobs per second with 2 worker processes over 1, each worker with one torch thread; `poll_p99_ms`: `GET /v1/jobs/{{id}}`
p99 under the load generator with the workers idle.)

## Set-up
{setup_block(setup, [
    "- the stack: `fastif_cli.stack.start_stack` — an embedded Redis, N single-process Celery workers, the API on 127.0.0.1; "
    "the model and a copy of the training file in a data root under runs/bench/service-root",
    f"- every query: one input, k = {config.k}, top 10, LiSSA J = {l['depth']}, B = {l['batch_size']}, T = {l['repeats']} "
    f"({data['best_note']})",
    f"- model registration to `ready` (features, prefix cache, faiss index): {data['build_seconds_1_worker']:.1f} s on the "
    f"first stack; the artefacts live on the shared volume (runs/bench/service-root/.fastif), so only the first run ever "
    "builds them (N = 10,000 × 66 tokens: a few minutes on this machine) and later registrations load them",
    f"- throughput: {t1['jobs']} distinct inputs sent as {t1['jobs']} jobs at once, timed until the last succeeds, in "
    f"{len(t1['rounds_jobs_per_s'])} rounds of fresh inputs per stack, the best round counted (jobs per second of every "
    f"round: 1 worker {_rates(t1)}; 2 workers {_rates(t2)}; 1 worker with 2 threads {_rates(t1x2)}); each "
    "stack was warmed up first (every worker loads the model on its first job). The headline ratio keeps one torch thread "
    "per worker, so it measures how the service spreads jobs over workers; the last row gives one worker both cores "
    "instead (intra-op threads), for comparison",
    f"- load generator: {pi['tool']}; the busy run polls a job at FastIF's configuration while it runs "
    f"(still running at the end: {'yes' if pb.get('job_still_running_at_end') else 'no'}; then cancelled)",
    "- two CPU cores are shared by the API, Redis, the workers, the load generator and this client (which polls every "
    "5 ms at first, backing off to 100 ms)",
])}

## Query latency

{table(["", "milliseconds"], rows)}

## Throughput

{table(["stack", "jobs", "seconds", "jobs per second", "vs 1 worker, 1 thread"], thr)}

Ratio 2 vs 1 workers: **{t2['jobs_per_s'] / t1['jobs_per_s']:.2f}×**.

## Status polls under load

{table(["while", "p50 ms", "p99 ms", "requests per second", "non-2xx"], polls)}
"""
