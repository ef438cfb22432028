"""Chaos: a steady mix of jobs while workers, Redis, the API and the state directory fail at random.

    python bench/chaos.py [--duration 600] [--workers 2] [--seed 0] [--out bench/results]

On loopback: a redis-server with an append-only file, N single-process Celery workers and the API,
on a tiny random BERT (nothing downloaded). First every request of the catalogue runs twice without
faults, with the caches emptied in between: that is the reference (and shows the comparison sees only
real differences). Then, for `duration` seconds, a client submits a job every second or so (single
inputs, a batch, a parallel job, explain, graph, self-influence; one in ten is cancelled soon after),
each with its own Idempotency-Key and retried through outages, while faults strike at random moments:
a worker's pool process SIGKILLed, a worker SIGKILLed whole and restarted under its name, a worker
restarted with SIGTERM, Redis restarted (append-only file kept), the API restarted, and the state
directory filled to the last byte for a few seconds (a small tmpfs; skipped where it cannot be mounted).
Every kind strikes at least once. Then the faults stop, and every job must end:

- succeeded, with results equal to the reference (scores within 1e-4) and complete (one per input);
- or failed / cancelled with a stated reason (cancelled only where the client asked);
- none left queued or running ("lost"), none created twice for one Idempotency-Key ("duplicated").

Writes `chaos.md` and `chaos.json` to `--out`; exits 1 when anything was lost, wrong or duplicated.
Not part of `make test` (tests/test_hardening_chaos.py runs a one-minute version).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from fastif_cli.stack import free_port, redis_server_binary, signal_group

_REPO = Path(__file__).resolve().parents[1]
FAULTS = ("kill-pool", "kill-worker", "restart-worker", "restart-redis", "restart-api", "fill-state-dir")
TERMINAL = ("succeeded", "failed", "cancelled")
# Keys of a result item that say how it was computed, not what it is (seconds, cache hits, file paths).
NOT_COMPARED = frozenset({"diagnostics", "images", "files"})


@dataclass(frozen=True)
class ChaosConfig:
    duration_s: float = 600.0
    workers: int = 2
    seed: int = 0
    submit_every_s: float = 1.0  # mean gap between submissions
    fault_every_s: float = 15.0  # mean gap between faults
    drain_timeout_s: float = 300.0  # after the faults stop, how long jobs may take to end
    state_dir_mib: int = 64
    # Dead workers' tasks come back after 2.5 beats (records/inflight.py): beat every second here.
    heartbeat_interval_s: float = 1.0
    # Fault-free runs of each request before the faults: the first is the reference, a second one
    # (caches emptied in between) shows that two fault-free runs compare equal.
    reference_runs: int = 2


@dataclass
class Submission:
    entry: str
    key: str
    job_id: str | None = None
    cancel: bool = False
    refused: str | None = None  # why the client never got a 202


@dataclass
class ChaosReport:
    config: dict
    submitted: int = 0
    accepted: int = 0
    refused: int = 0
    by_entry: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)
    skipped_faults: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)
    failed_by_code: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)  # "entry: code: message" of each failed job
    lost: int = 0
    wrong: int = 0
    duplicated: int = 0
    problems: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return self.lost == self.wrong == self.duplicated == 0


# -- the stack, one process at a time ------------------------------------------------------------------

class ChaosStack:
    """Redis, workers and the API as separate child processes, each of which can be killed and restarted."""

    def __init__(self, scratch: Path, config: ChaosConfig) -> None:
        self.scratch = scratch
        self.config = config
        self.redis_port, self.api_port = free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.state_dir = scratch / "state"
        self.state_dir.mkdir(parents=True)
        self.small_state_dir = _mount_tmpfs(self.state_dir, config.state_dir_mib)
        (scratch / "redis").mkdir()
        (scratch / "logs").mkdir()
        self.env = {**os.environ, "REDIS_URL": self.redis_url, "FASTIF_DATA_ROOT": str(scratch / "data"),
                    "FASTIF_STATE_DIR": str(self.state_dir), "FASTIF_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "FASTIF_HEARTBEAT_INTERVAL_S": str(config.heartbeat_interval_s)}
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * config.workers

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.scratch / "logs" / f"{name}.log", "ab")
        # Own session: a fault signals the whole group. (No PR_SET_PDEATHSIG: it fires when the *thread*
        # that started the child ends, and the fault thread restarts processes.)
        return subprocess.Popen(argv, env=self.env, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_redis(self) -> None:
        self.redis = self._start("redis", [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.redis_port),
                                           "--dir", str(self.scratch / "redis"), "--save", "", "--appendonly", "yes",
                                           "--appendfsync", "everysec"])
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5)
        _until(lambda: _pings(client), 30, "redis-server did not start")

    def start_worker(self, index: int) -> None:
        self.workers[index] = self._start(f"worker-{index}", [sys.executable, "-m", "fastif_cli.main", "worker",
                                                              "--concurrency", "1", "--hostname", f"worker{index}@%h"])

    def start_api(self) -> None:
        self.api = self._start("api", [sys.executable, "-m", "fastif_cli.main", "serve", "--host", "127.0.0.1",
                                       "--port", str(self.api_port)])
        _until(lambda: _answers(f"{self.url}/healthz"), 60, "the API did not start")

    def start(self) -> None:
        self.start_redis()
        for index in range(self.config.workers):
            self.start_worker(index)
        self.start_api()
        _until(lambda: _answers(f"{self.url}/readyz"), 120, "no worker became ready")

    def stop(self) -> None:
        for proc in [self.api, *self.workers, self.redis]:
            if proc is not None:
                _stop_group(proc, grace_s=5)
        if self.small_state_dir:
            subprocess.run(["umount", "-l", str(self.state_dir)], capture_output=True)


def _mount_tmpfs(folder: Path, mib: int) -> bool:
    """A small tmpfs as the state directory, so that it can be filled; False where mounting is not allowed."""
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(check, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.1)


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc, signal.SIGKILL)  # whatever is left of the group (pool processes)
    proc.wait()


def pool_children(pid: int) -> list[int]:
    """The prefork pool processes of a Celery worker (its direct children)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


# -- faults ----------------------------------------------------------------------------------------

class Faults:
    """Injects one fault of a kind into the stack; says False when the kind cannot strike now."""

    def __init__(self, stack: ChaosStack, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng

    def inject(self, kind: str) -> bool:
        return getattr(self, kind.replace("-", "_"))()

    def _worker(self) -> int:
        return self.rng.randrange(len(self.stack.workers))

    def kill_pool(self, patience_s: float = 15.0) -> bool:
        """SIGKILL one worker's pool processes; a worker just (re)started has none until its pool is up, so wait for one."""
        deadline = time.monotonic() + patience_s
        while True:
            with_pool = [children for proc in self.stack.workers
                         if proc is not None and (children := pool_children(proc.pid))]
            if with_pool:
                for child in self.rng.choice(with_pool):
                    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                        os.kill(child, signal.SIGKILL)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def kill_worker(self) -> bool:
        index = self._worker()
        proc = self.stack.workers[index]
        signal_group(proc, signal.SIGKILL)
        proc.wait()
        time.sleep(self.rng.uniform(0, 2))
        self.stack.start_worker(index)  # same hostname: the reaper must tell it from the dead one
        return True

    def restart_worker(self) -> bool:
        index = self._worker()
        _stop_group(self.stack.workers[index], grace_s=10)
        self.stack.start_worker(index)
        return True

    def restart_redis(self) -> bool:
        _stop_group(self.stack.redis, grace_s=10)  # SIGTERM: Redis writes its append-only file out
        time.sleep(self.rng.uniform(1, 3))
        self.stack.start_redis()
        return True

    def restart_api(self) -> bool:
        _stop_group(self.stack.api, grace_s=10)
        self.stack.start_api()
        return True

    def fill_state_dir(self) -> bool:
        if not self.stack.small_state_dir:
            return False
        filler = self.stack.state_dir / f"filler-{uuid.uuid4().hex}"
        try:
            with open(filler, "wb") as out:
                while True:
                    out.write(b"\0" * (1 << 20))
                    out.flush()
        except OSError:
            pass  # the disk is full now
        time.sleep(self.rng.uniform(3, 6))
        filler.unlink(missing_ok=True)
        return True


# -- the client ------------------------------------------------------------------------------------

def catalogue(model_id: str) -> dict[str, tuple[str, dict]]:
    """(path, body) of each request the client sends; LiSSA long enough that faults hit jobs mid-way."""
    lissa = {"damp": 0.01, "scale": 1000.0, "depth": 600, "batch_size": 2, "repeats": 1}
    one = [{"text": "a warm and lovely film"}]
    return {
        "single": ("/v1/influence", {"model_id": model_id, "inputs": one, "k": 30, "top": 5,
                                     "lissa": {**lissa, "seed": 1}}),
        "single-other": ("/v1/influence", {"model_id": model_id, "inputs": [{"text": "dull and boring acting"}],
                                           "k": 30, "top": 5, "lissa": {**lissa, "seed": 2}}),
        "batch": ("/v1/influence", {"model_id": model_id, "k": 30, "top": 5, "lissa": {**lissa, "seed": 3},
                                    "inputs": [{"text": t} for t in ("great fun", "awful plot", "nice story",
                                                                     "weak and sad")]}),
        "parallel": ("/v1/influence", {"model_id": model_id, "inputs": one, "k": 30, "top": 5, "parallel": 2,
                                       "lissa": {**lissa, "seed": 4}}),
        "explain": ("/v1/explain", {"model_id": model_id, "inputs": one, "k": 30, "top": 5,
                                    "lissa": {**lissa, "seed": 5}}),
        "graph": ("/v1/graph", {"model_id": model_id, "inputs": [{"text": "superb film"}, {"text": "poor film"}],
                                "k": 30, "top": 3, "lissa": {**lissa, "seed": 6}}),
        "self-influence": ("/v1/self-influence", {"model_id": model_id, "sample": 8, "seed": 7,
                                                  "lissa": {**lissa, "depth": 100, "seed": 7}}),
    }


class Client:
    """The API as a patient caller sees it: retries through outages, an Idempotency-Key per submission."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def call(self, method: str, path: str, patience_s: float = 60, **kwargs) -> httpx.Response | None:
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.HTTPError:
                time.sleep(0.3)
                continue
            if response.status_code in (429, 503):
                time.sleep(min(float(response.headers.get("retry-after") or 0.5), 2.0))
                continue
            return response
        return None

    def submit(self, submission: Submission, path: str, body: dict) -> None:
        response = self.call("POST", path, json=body, headers={"Idempotency-Key": submission.key})
        if response is not None and response.status_code == 202:
            submission.job_id = response.json()["id"]
        else:
            submission.refused = "no answer" if response is None else f"{response.status_code}: {response.text[:200]}"

    def wait(self, job_id: str, timeout_s: float) -> dict | None:
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            response = self.call("GET", f"/v1/jobs/{job_id}", patience_s=max(1.0, deadline - time.monotonic()))
            if response is not None and response.status_code == 200:
                job = response.json()
                if job["status"] in TERMINAL:
                    return job
            time.sleep(0.2)
        return job

    def results(self, job_id: str) -> list[dict]:
        items: list[dict] = []
        while True:
            response = self.call("GET", f"/v1/jobs/{job_id}/results", params={"offset": len(items), "limit": 1000})
            page = response.json()
            items += page["items"]
            if len(items) >= page["total"] or not page["items"]:
                return items


def same(reference: Any, other: Any) -> bool:
    """Equal up to float noise (relative 1e-4), leaving out how the result was computed (NOT_COMPARED)."""
    if isinstance(reference, dict) and isinstance(other, dict):
        keys = set(reference) - NOT_COMPARED
        return keys == set(other) - NOT_COMPARED and all(same(reference[k], other[k]) for k in keys)
    if isinstance(reference, list) and isinstance(other, list):
        return len(reference) == len(other) and all(same(a, b) for a, b in zip(reference, other))
    if isinstance(reference, float) or isinstance(other, float):
        return isinstance(other, (int, float)) and math.isclose(reference, other, rel_tol=1e-4, abs_tol=1e-7)
    return reference == other


# -- the run ---------------------------------------------------------------------------------------

def _empty_caches(client: redis.Redis) -> None:
    for key in client.scan_iter("fastif:v1:*", count=1000):
        client.delete(key)


def _make_data_root(root: Path) -> None:
    from fastif_cli.demo import save_tiny_bert
    from fastif_cli.demo_data import LABELS, make_demo_data, write_train

    data = make_demo_data(count=160)
    write_train(root / "reviews.jsonl", data)
    save_tiny_bert(root / "model", data, dict(enumerate(LABELS)), {name: i for i, name in enumerate(LABELS)})


def reference_results(client: Client, store: redis.Redis, requests: dict[str, tuple[str, dict]],
                      runs_per_request: int) -> dict[str, list]:
    """Each request `runs_per_request` times without faults, cold caches each time; the comparison must find them the same."""
    runs: dict[str, list[list]] = {name: [] for name in requests}
    for _ in range(runs_per_request):
        _empty_caches(store)
        for name, (path, body) in requests.items():
            submission = Submission(name, uuid.uuid4().hex)
            client.submit(submission, path, body)
            job = client.wait(submission.job_id, 300) if submission.job_id else None
            if job is None or job["status"] != "succeeded":
                raise RuntimeError(f"the fault-free run of {name} did not succeed: {job or submission.refused}")
            runs[name].append(client.results(job["id"]))
    for name, (first, *others) in runs.items():
        if not all(same(first, other) for other in others):
            raise RuntimeError(f"two fault-free runs of {name} differ: the comparison or the engine is not deterministic")
    _empty_caches(store)
    return {name: pair[0] for name, pair in runs.items()}


def run_chaos(config: ChaosConfig, log=print) -> ChaosReport:
    started = time.monotonic()
    rng = random.Random(config.seed)
    scratch = Path(tempfile.mkdtemp(prefix="fastif-chaos-"))
    report = ChaosReport(config=asdict(config))
    _make_data_root(scratch / "data")
    stack = ChaosStack(scratch, config)
    try:
        stack.start()
        client = Client(stack.url)
        store = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        registered = client.call("POST", "/v1/models", json={"name": "chaos", "model_path": "model",
                                                             "train_data": {"path": "reviews.jsonl"}})
        model = client.wait(registered.json()["build_job_id"], 300)
        if model is None or model["status"] != "succeeded":
            raise RuntimeError(f"the model build did not succeed: {model}")
        requests = catalogue(registered.json()["id"])
        log(f"chaos: stack up in {scratch}; reference runs of {len(requests)} requests ...")
        reference = reference_results(client, store, requests, config.reference_runs)

        log(f"chaos: {config.duration_s:.0f} s of jobs and faults ...")
        submissions = _submit_under_faults(config, rng, stack, client, store, requests, report, log)

        log("chaos: faults over; waiting for every job to end ...")
        _revive(stack)
        _check(config, client, store, submissions, reference, report)
    finally:
        stack.stop()
        report.seconds = round(time.monotonic() - started, 1)
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _submit_under_faults(config, rng, stack, client, store, requests, report, log) -> list[Submission]:
    faults = Faults(stack, rng)
    stop = threading.Event()
    counts, skipped = Counter(), Counter()

    def strike() -> None:
        # Every kind once, in a random order, then at random: a short run still sees each kind.
        order = rng.sample(FAULTS, len(FAULTS))
        first_gap = min(config.fault_every_s, config.duration_s / (len(FAULTS) + 1))
        while not stop.wait(rng.uniform(0.5, 1.0) * first_gap if order else rng.expovariate(1.0 / config.fault_every_s)):
            kind = order.pop() if order else rng.choice(FAULTS)
            try:
                (counts if faults.inject(kind) else skipped)[kind] += 1
            except Exception as err:  # a fault that could not be injected is a bug of this script: say so
                report.problems.append(f"injecting {kind}: {type(err).__name__}: {err}")
            log(f"chaos: fault {kind}")

    striker = threading.Thread(target=strike, name="chaos-faults", daemon=True)
    striker.start()
    submissions: list[Submission] = []
    deadline = time.monotonic() + config.duration_s
    names = list(requests)
    while time.monotonic() < deadline:
        name = rng.choice(names)
        submission = Submission(name, uuid.uuid4().hex, cancel=rng.random() < 0.1)
        path, body = requests[name]
        client.submit(submission, path, body)
        submissions.append(submission)
        if submission.cancel and submission.job_id:
            time.sleep(rng.uniform(0, 1.5))
            client.call("POST", f"/v1/jobs/{submission.job_id}/cancel")
        if rng.random() < 0.1:
            try:
                _empty_caches(store)  # so that later jobs compute again instead of reading the cache
            except redis.RedisError:
                pass  # Redis is being restarted
        time.sleep(rng.expovariate(1.0 / config.submit_every_s))
    stop.set()
    striker.join()
    report.faults, report.skipped_faults = dict(counts), dict(skipped)
    return submissions


def _revive(stack: ChaosStack) -> None:
    """Whatever a fault left down comes back before the jobs are judged."""
    if stack.redis.poll() is not None:
        stack.start_redis()
    for index, proc in enumerate(stack.workers):
        if proc is None or proc.poll() is not None:
            stack.start_worker(index)
    if stack.api.poll() is not None:
        stack.start_api()


def _check(config, client: Client, store: redis.Redis, submissions: list[Submission], reference: dict,
           report: ChaosReport) -> None:
    report.submitted = len(submissions)
    report.by_entry = dict(Counter(s.entry for s in submissions))
    by_key = {s.key: s for s in submissions}
    # Every job record with one of our keys (a submission whose 202 was lost still made its job).
    records: dict[str, list[str]] = {}
    for name in store.scan_iter("fastif:job:*", count=1000):
        if name.count(":") != 2:
            continue  # a parallel job's shard state, not a job record
        fields = store.hgetall(name)
        if fields.get("idempotency_key") in by_key:
            records.setdefault(fields["idempotency_key"], []).append(fields["id"])
    for key, ids in records.items():
        if len(ids) > 1:
            report.duplicated += len(ids) - 1
            report.problems.append(f"{by_key[key].entry}: {len(ids)} jobs for one Idempotency-Key: {ids}")
        if by_key[key].job_id is None:
            by_key[key].job_id = ids[0]
    outcomes, failed = Counter(), Counter()
    deadline = time.monotonic() + config.drain_timeout_s
    for submission in submissions:
        if submission.job_id is None:
            report.refused += 1
            continue
        report.accepted += 1
        job = client.wait(submission.job_id, max(1.0, deadline - time.monotonic()))
        status = job["status"] if job else "missing"
        outcomes[status] += 1
        where = f"{submission.entry} job {submission.job_id}"
        if status not in TERMINAL:
            report.lost += 1
            report.problems.append(f"{where} is {status} after the faults stopped")
        elif status == "failed":
            error = job.get("error") or {}
            failed[error.get("code") or "?"] += 1
            report.failures.append(f"{submission.entry}: {error.get('code')}: {(error.get('message') or '')[:300]}")
            if not error.get("code") or not error.get("message"):
                report.wrong += 1
                report.problems.append(f"{where} failed without a stated reason")
        elif status == "cancelled" and not submission.cancel:
            report.wrong += 1
            report.problems.append(f"{where} was cancelled though nobody asked")
        elif status == "succeeded":
            items = client.results(submission.job_id)
            stored = store.llen(f"fastif:results:{submission.job_id}")
            if not same(reference[submission.entry], items) or not stored == job["result_count"] == len(items):
                report.wrong += 1
                report.problems.append(f"{where} succeeded with results unlike the fault-free run's "
                                       f"({len(items)} items, {stored} stored)")
    report.outcomes, report.failed_by_code = dict(outcomes), dict(failed)


# -- the report ------------------------------------------------------------------------------------

def write_report(report: ChaosReport, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = {**asdict(report), "clean": report.clean}
    json_path = out / "chaos.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    c = report.config
    rows = "\n".join(f"| {kind} | {report.faults.get(kind, 0)} |" for kind in FAULTS)
    skipped = ", ".join(f"{k} ×{n}" for k, n in report.skipped_faults.items()) or "none"
    md = f"""# chaos

`python bench/chaos.py --duration {c['duration_s']:.0f} --workers {c['workers']} --seed {c['seed']}`: {report.seconds:.0f} s
in all, on loopback (Redis with an append-only file, {c['workers']} workers, the API, a tiny random BERT).

| | |
|---|---|
| jobs submitted | {report.submitted} ({', '.join(f'{k} {n}' for k, n in sorted(report.by_entry.items()))}) |
| accepted (202) / refused | {report.accepted} / {report.refused} |
| outcomes | {', '.join(f'{k} {n}' for k, n in sorted(report.outcomes.items()))} |
| failed, by code | {', '.join(f'{k} {n}' for k, n in sorted(report.failed_by_code.items())) or 'none'} |
| **lost** | **{report.lost}** |
| **wrong** | **{report.wrong}** |
| **duplicated** | **{report.duplicated}** |

| fault | injected |
|---|---|
{rows}

Faults that could not strike when drawn: {skipped}.

Failed jobs and their stated reasons:
{chr(10).join('- ' + f for f in report.failures) if report.failures else 'none'}

{chr(10).join('- ' + p for p in report.problems) if report.problems else 'No problem found.'}
"""
    md_path = out / "chaos.md"
    md_path.write_text(md)
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of jobs and faults (default 600)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-every", type=float, default=15.0, help="mean seconds between faults")
    parser.add_argument("--out", type=Path, default=_REPO / "bench" / "results")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the stack is stopped and the tmpfs unmounted on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.duration <= 0 or args.workers < 1 or args.fault_every <= 0:
        parser.error("--duration and --fault-every must be positive and --workers at least 1")
    report = run_chaos(ChaosConfig(duration_s=args.duration, workers=args.workers, seed=args.seed,
                                   fault_every_s=args.fault_every))
    md, _ = write_report(report, args.out)
    print(md.read_text())
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
