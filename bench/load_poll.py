"""Load: many clients polling job status at once, against the API under uvicorn.

    python bench/load_poll.py                       # 200 connections, 60 s, wrk if installed
    python bench/load_poll.py --duration 10 --json out.json
    python bench/load_poll.py --url http://host:8000 --api-key K   # an API that is already running

Without --url it starts what it needs: a private redis-server on a free port (or the one
in REDIS_URL) and `fastif serve` (uvicorn, one process) on a free port, with a scratch
data root. It registers a model, marks it ready as a worker would, and creates --jobs
influence jobs through the API, some marked running and succeeded; no worker runs, so
the load is the API's alone. Then the generator keeps --connections connections busy
with GET /v1/jobs/{id}, cycling over the jobs, for --duration seconds.

The generator is wrk (C, event loop) when installed, else an asyncio httpx client with
the same number of concurrent connections. Both count as an error every failed
connection, timeout and non-2xx response. Prints a summary and one JSON line; exits 1
if there was any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(_REPO))

from fastif_cli.stack import free_port, redis_server_binary, stop_process  # noqa: E402

WRK_SCRIPT = """
ids = {%(ids)s}
counter = 0
headers = {%(headers)s}
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/jobs/" .. ids[(counter %% #ids) + 1], headers)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class LoadResult:
    generator: str
    connections: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    error_kinds: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.generator}: {self.connections} connections for {self.duration_s:.1f} s: "
                f"{self.requests} requests ({self.requests_per_s:.0f}/s), {self.errors} errors; "
                f"latency p50 {self.p50_ms:.1f} ms, p90 {self.p90_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
                f"max {self.max_ms:.1f} ms")


# -- the service under test -------------------------------------------------------------------

class Service:
    """Redis (unless given) and `fastif serve` as child processes; stop() ends both."""

    def __init__(self, redis_url: str | None = None, api_keys: str = "") -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="fastif-load-"))
        self.procs: list[subprocess.Popen] = []
        if redis_url is None:
            port = free_port()
            self.procs.append(subprocess.Popen(
                [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                 "no", "--dir", str(self.scratch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            redis_url = f"redis://127.0.0.1:{port}/0"
        self.redis_url = redis_url
        self.api_keys = api_keys
        root = self.scratch / "data"
        (root / "model").mkdir(parents=True)
        (root / "model" / "config.json").write_text("{}")
        (root / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root), "FASTIF_API_KEYS": api_keys}
        self.log = open(self.scratch / "api.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "fastif_cli.main", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=_REPO, stdout=self.log, stderr=subprocess.STDOUT))
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout_s: float = 60) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a child exited during start-up; see {self.scratch / 'api.log'}")
            try:
                if redis.Redis.from_url(self.redis_url).ping() and httpx.get(self.url + "/healthz").status_code == 200:
                    return
            except (redis.RedisError, httpx.HTTPError):
                pass
            time.sleep(0.2)
        raise RuntimeError("the API did not come up")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, grace_s=10)
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def seed_jobs(url: str, redis_url: str, count: int, headers: dict[str, str]) -> list[str]:
    """A ready model and `count` influence jobs made through the API; some running, some done."""
    import redis

    from records.jobs import JobStore
    from records.models import ModelStore

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        response = http.post("/v1/models", json={"name": "load", "model_path": "model",
                                                 "train_data": {"path": "train.jsonl"}})
        response.raise_for_status()
        model_id = response.json()["id"]
        ModelStore(client).set_ready(model_id, f"fp-load-{model_id}", 1, ["negative", "positive"])
        ids = []
        for i in range(count):
            response = http.post("/v1/influence", json={"model_id": model_id,
                                                        "inputs": [{"text": f"polled job {i}"}], "k": 10})
            response.raise_for_status()
            ids.append(response.json()["id"])
    jobs = JobStore(client)
    for i, job_id in enumerate(ids):
        if i % 3 == 1:
            jobs.start_delivery(job_id)
            jobs.set_progress(job_id, "s_test", 10, 1000)
        elif i % 3 == 2:
            jobs.start_delivery(job_id)
            jobs.succeed(job_id, [{"input_index": 0}])
    client.close()
    return ids


# -- generators ---------------------------------------------------------------------------------

def run_wrk(url: str, ids: list[str], connections: int, duration_s: float, threads: int,
            headers: dict[str, str]) -> LoadResult:
    script = WRK_SCRIPT % {
        "ids": ", ".join(json.dumps(i) for i in ids),
        "headers": ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        done = subprocess.run(
            ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(duration_s)}s", "--timeout", "10s",
             "-s", handle.name, url], capture_output=True, text=True, timeout=duration_s + 60)
    finally:
        os.unlink(handle.name)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("LOADJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("LOADJSON "))
    kinds = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")}
    seconds = raw["duration_us"] / 1e6
    return LoadResult("wrk", connections, seconds, raw["requests"], sum(kinds.values()), raw["requests"] / seconds,
                      raw["p50_us"] / 1e3, raw["p90_us"] / 1e3, raw["p99_us"] / 1e3, raw["max_us"] / 1e3, kinds)


def run_httpx(url: str, ids: list[str], connections: int, duration_s: float,
              headers: dict[str, str]) -> LoadResult:
    """`connections` asyncio clients, each polling in a loop on its own keep-alive connection."""

    async def main() -> tuple[list[float], dict[str, int], float]:
        latencies: list[float] = []
        kinds: dict[str, int] = {}
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
            start = time.perf_counter()
            deadline = start + duration_s

            async def poller(offset: int) -> None:
                n = offset
                while time.perf_counter() < deadline:
                    n += 1
                    sent = time.perf_counter()
                    try:
                        response = await client.get(f"/v1/jobs/{ids[n % len(ids)]}")
                        if response.status_code >= 300:
                            kinds["status"] = kinds.get("status", 0) + 1
                    except httpx.TimeoutException:
                        kinds["timeout"] = kinds.get("timeout", 0) + 1
                    except httpx.HTTPError:
                        kinds["connect"] = kinds.get("connect", 0) + 1
                    latencies.append(time.perf_counter() - sent)

            await asyncio.gather(*(poller(i) for i in range(connections)))
            return latencies, kinds, time.perf_counter() - start

    latencies, kinds, seconds = asyncio.run(main())
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0.0

    return LoadResult("httpx-asyncio", connections, seconds, len(latencies), sum(kinds.values()),
                      len(latencies) / seconds, pct(0.50), pct(0.90), pct(0.99), pct(1.0) if latencies else 0.0, kinds)


def run_load(duration_s: float = 60, connections: int = 200, jobs: int = 100, generator: str = "auto",
             threads: int = 2, url: str | None = None, api_key: str = "") -> LoadResult:
    """Start the service (unless `url`), seed jobs, run the generator; the service is stopped after."""
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "httpx"
    headers = {"X-API-Key": api_key} if api_key else {}
    service = None
    try:
        if url is None:
            service = Service(os.environ.get("REDIS_URL") or None, api_keys=api_key)
            url = service.url
            ids = seed_jobs(url, service.redis_url, jobs, headers)
        else:
            with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
                ids = [j["id"] for j in http.get("/v1/jobs", params={"limit": jobs}).json()["items"]]
            if not ids:
                raise RuntimeError(f"{url} has no jobs to poll")
        if generator == "wrk":
            return run_wrk(url, ids, connections, duration_s, threads, headers)
        return run_httpx(url, ids, connections, duration_s, headers)
    finally:
        if service is not None:
            service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--connections", type=int, default=200, help="concurrent clients (default 200)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs to poll, cycled over (default 100)")
    parser.add_argument("--generator", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--url", help="an API already running (its existing jobs are polled)")
    parser.add_argument("--api-key", default="", help="X-API-Key to send (and to configure, without --url)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run_load(args.duration, args.connections, args.jobs, args.generator, args.threads, args.url, args.api_key)
    print(result.summary())
    print(json.dumps(asdict(result)))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
