"""fastif_client and the `fastif` client commands against the real stack: real Redis, a real Celery
worker process, the real API with an API key.

The one fake is an httpx.MockTransport in the retry tests: it plays a service that answers 503
and 429 with a Retry-After, which the real one does only when Redis or its queue is down, to
check the client's own retry timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
import redis

from api_schemas import ExplainItem, InfluenceRequest, Job, Model, Progress, ResultItem
from conftest import _FLUSH_KEEP_LOCK, LOCK_KEY, LOCK_TTL_S
from fastif_cli.stack import free_port, start_stack
from fastif_client import (
    AsyncFastIFClient,
    FastIFClient,
    FastIFError,
    Invalid,
    JobCancelled,
    NotCancellable,
    NotFound,
    NotReady,
    PollSchedule,
    QueueFull,
    TooLarge,
    Unauthorized,
    Unavailable,
    item_model,
    retry_after_seconds,
)
from tiny import make_tiny_bert, sentences, write_jsonl

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "client-test-key"
PROBLEM = "https://fastif.dev/problems/"
FAST_POLL = PollSchedule(first=0.05, factor=1.5, cap=0.5)
# A LiSSA run long enough to be caught running and cancelled (it checks the cancel flag as it goes).
ENDLESS_LISSA = {"damp": 0.01, "scale": 1000.0, "depth": 100_000, "batch_size": 2, "seed": 5}
MAX_INPUTS = 8  # inline inputs per job (FASTIF_MAX_INPUTS): a 413 is one input more
TEXTS = ["a great and lovely film", "boring and sad plot", "the acting was fine"]


class Service:
    """The running stack, its data root and a raw httpx client (with the key) to compare against."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        self.raw = httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=30)
        self.build_progress: list[Progress] = []
        self.model: Model | None = None

    def client(self, **options) -> FastIFClient:
        return FastIFClient(self.url, **{"api_key": API_KEY, "poll": FAST_POLL, **options})

    def raw_items(self, job_id: str) -> list[dict]:
        response = self.raw.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000})
        assert response.status_code == 200, response.text
        return response.json()["items"]


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("client-root")
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(60, seed=2, noise=0.1))
    # Empty the DB but keep the session's claim on it (see conftest).
    claim = redis.Redis.from_url(redis_url, decode_responses=True)
    claim.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, claim.get(LOCK_KEY) or "held", LOCK_TTL_S)
    claim.close()
    env = {"REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root), "FASTIF_API_KEYS": API_KEY,
           "FASTIF_MAX_INPUTS": str(MAX_INPUTS)}
    procs, url, _ = start_stack("127.0.0.1", free_port(), workers=1, log_dir=tmp_path_factory.mktemp("client-logs"),
                                extra_env=env, threads_per_worker=1)
    service = Service(url, root)
    try:
        with service.client() as client:
            service.model = client.register_model(
                {"name": "tiny", "model_path": "model", "train_data": {"path": "train.jsonl"}},
                timeout=180, on_progress=service.build_progress.append)
        yield service
    finally:
        service.raw.close()
        procs.stop(grace_s=10)


@pytest.fixture
def client(service) -> Iterator[FastIFClient]:
    with service.client() as client:
        yield client


# -- models ----------------------------------------------------------------------------------------

def test_register_waits_until_the_model_is_ready(service, client):
    model = service.model
    assert isinstance(model, Model) and model.status == "ready" and model.num_train == 60
    assert model.labels == ["negative", "positive"]
    # The progress callback was fed by the build job (a build of seconds, polled at least twice a second).
    seen = service.build_progress
    assert seen, "the progress callback was never called"
    assert any(p.stage not in (None, "queued") for p in seen), seen
    assert all(a != b for a, b in zip(seen, seen[1:])), "a progress was reported twice"
    build = client.get_job(model.build_job_id)
    assert build.kind == "build_model" and build.status == "succeeded"
    assert client.get_model(model.id) == model
    assert model.id in [m.id for m in client.list_models()]


def test_delete_model_forgets_it(service, client):
    building = client.register_model({"name": "to-delete", "model_path": "model", "train_data": {"path": "train.jsonl"}},
                                     wait=False)
    assert building.status == "building"
    client.delete_model(building.id)
    with pytest.raises(NotFound) as caught:
        client.get_model(building.id)
    assert caught.value.type == PROBLEM + "model-not-found"
    assert building.id not in [m.id for m in client.list_models()]


# -- jobs ------------------------------------------------------------------------------------------

def test_influence_job_waits_with_progress_and_pages_through_the_raw_results(service, client):
    request = InfluenceRequest(model_id=service.model.id, inputs=[{"text": t} for t in TEXTS], k=20, top=3)
    job = client.submit_influence(request)
    assert isinstance(job, Job) and job.kind == "influence" and job.status in ("queued", "running")
    seen: list[Progress] = []
    done = client.wait_for_job(job.id, timeout=180, on_progress=seen.append)
    assert done.status == "succeeded" and done.result_count == len(TEXTS)
    assert seen and seen[-1] == done.progress
    assert all(a != b for a, b in zip(seen, seen[1:])), "a progress was reported twice"

    raw = service.raw_items(job.id)
    # Pages of 2 over 3 items: the second page is a partial one.
    assert list(client.iter_results(job.id, page_size=2)) == raw
    typed = list(client.iter_results(job.id, page_size=2, item_type=ResultItem))
    assert [item.input_index for item in typed] == [0, 1, 2]
    assert [[(e.train_index, e.score) for e in item.helpful + item.harmful] for item in typed] == \
        [[(e["train_index"], e["score"]) for e in item["helpful"] + item["harmful"]] for item in raw]
    assert sum(len(item.helpful) + len(item.harmful) for item in typed) > 0
    assert item_model(done.kind) is ResultItem
    page = client.results_page(job.id, offset=1, limit=1)
    assert page.total == 3 and page.items == raw[1:2]
    # The JSON Lines stream: the same items in one request, raw or typed.
    assert list(client.stream_results(job.id)) == raw
    assert [item.input_index for item in client.stream_results(job.id, item_type=ResultItem)] == [0, 1, 2]


def test_explain_job_from_a_mapping(service, client):
    job = client.submit("explain", {"model_id": service.model.id, "k": 20, "top": 2,
                                    "inputs": [{"text": TEXTS[0]}, {"text": TEXTS[1], "label": "positive"}]})
    seen: list[Progress] = []
    done = client.wait_for_job(job.id, timeout=180, on_progress=seen.append)
    assert done.kind == "explain" and seen and seen[-1] == done.progress
    items = list(client.iter_results(job.id, item_type=item_model(done.kind)))
    assert all(isinstance(item, ExplainItem) for item in items) and len(items) == 2
    assert items[1].label_used == "positive"
    raw = service.raw_items(job.id)
    assert [(i.prediction.label, i.agreement.helpful) for i in items] == \
        [(r["prediction"]["label"], r["agreement"]["helpful"]) for r in raw]
    assert list(client.iter_results(job.id, page_size=1)) == raw
    # output_path: the same items, written as JSON Lines into the data root when the job succeeded.
    (service.root / "out").mkdir(exist_ok=True)
    written = client.submit_explain({"model_id": service.model.id, "k": 20, "top": 2, "output_path": "out/explained.jsonl",
                                     "inputs": [{"text": TEXTS[0]}, {"text": TEXTS[1], "label": "positive"}]})
    assert client.wait_for_job(written.id, timeout=180).status == "succeeded"
    lines = (service.root / "out" / "explained.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == service.raw_items(written.id)
    assert [p.name for p in (service.root / "out").iterdir()] == ["explained.jsonl"]  # no partial file left
    # The same Idempotency-Key and request give the same job.
    body = {"model_id": service.model.id, "k": 20, "top": 2, "inputs": [{"text": TEXTS[2]}]}
    first = client.submit_explain(body, idempotency_key="client-explain-1")
    assert client.submit_explain(body, idempotency_key="client-explain-1").id == first.id


def test_cancel_from_the_progress_callback(service, client):
    job = client.submit_influence({"model_id": service.model.id, "inputs": [{"text": "the plot was weak"}],
                                   "k": 10, "lissa": ENDLESS_LISSA})
    asked: list[Job] = []

    def cancel_once_solving(progress: Progress) -> None:
        if progress.stage == "s_test" and progress.done > 0 and not asked:
            asked.append(client.cancel_job(job.id))

    with pytest.raises(JobCancelled) as caught:
        client.wait_for_job(job.id, timeout=180, on_progress=cancel_once_solving)
    assert asked and asked[0].cancel_requested
    cancelled = caught.value.job
    assert cancelled.id == job.id and cancelled.status == "cancelled"
    assert cancelled.progress.done < ENDLESS_LISSA["depth"]
    with pytest.raises(NotCancellable) as again:
        client.cancel_job(job.id)
    assert again.value.status == 409 and again.value.type == PROBLEM + "job-not-cancellable"
    with pytest.raises(NotReady) as not_finished:
        list(client.iter_results(job.id))
    assert not_finished.value.type == PROBLEM + "job-not-finished"
    with pytest.raises(NotReady) as not_streamed:
        list(client.stream_results(job.id))
    assert not_streamed.value.status == 409 and not_streamed.value.type == PROBLEM + "job-not-finished"
    assert job.id in [j.id for j in client.list_jobs(status="cancelled")]
    assert all(j.status == "succeeded" for j in client.list_jobs(status="succeeded"))


def test_wait_times_out_with_the_last_job_seen(service, client):
    from fastif_client import WaitTimeout

    job = client.submit_influence({"model_id": service.model.id, "inputs": [{"text": "dull and cold"}], "k": 10,
                                   "lissa": {**ENDLESS_LISSA, "seed": 6}})
    try:
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as caught:
            client.wait_for_job(job.id, timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 10
        assert caught.value.last.id == job.id and caught.value.last.status in ("queued", "running")
    finally:
        client.cancel_job(job.id)
    with pytest.raises(JobCancelled):
        client.wait_for_job(job.id, timeout=120)


# -- problems as typed exceptions --------------------------------------------------------------------

def _raw_problem(service: Service, method: str, path: str, **kwargs) -> dict:
    response = service.raw.request(method, path, **kwargs)
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return response.json()


def test_every_problem_is_raised_as_its_exception(service, client):
    model_id = service.model.id
    unknown_label = {"model_id": model_id, "inputs": [{"text": "fine", "label": "sarcastic"}]}
    too_many = {"model_id": model_id, "inputs": [{"text": "fine"}] * (MAX_INPUTS + 1)}
    cases = [
        (lambda: client.get_job("nope"), ("GET", "/v1/jobs/nope", {}), NotFound, "job-not-found"),
        (lambda: client.get_model("nope"), ("GET", "/v1/models/nope", {}), NotFound, "model-not-found"),
        (lambda: client.submit_influence({"model_id": "nope", "inputs": [{"text": "x"}]}),
         ("POST", "/v1/influence", {"json": {"model_id": "nope", "inputs": [{"text": "x"}]}}), NotFound,
         "model-not-found"),
        (lambda: client.submit_influence(unknown_label), ("POST", "/v1/influence", {"json": unknown_label}), Invalid,
         "unknown-label"),
        (lambda: client.create_model({"name": "x", "model_path": "../outside", "train_data": {"path": "train.jsonl"}}),
         ("POST", "/v1/models", {"json": {"name": "x", "model_path": "../outside", "train_data": {"path": "train.jsonl"}}}),
         Invalid, "path-outside-data-root"),
        (lambda: client.list_jobs(status="bogus"), ("GET", "/v1/jobs", {"params": {"status": "bogus"}}), Invalid,
         "invalid-request"),
        (lambda: client.submit_influence(too_many), ("POST", "/v1/influence", {"json": too_many}), TooLarge,
         "too-many-inputs"),
    ]
    for call, (method, path, kwargs), expected, slug in cases:
        problem = _raw_problem(service, method, path, **kwargs)
        with pytest.raises(expected) as caught:
            call()
        error = caught.value
        assert error.type == problem["type"] == PROBLEM + slug, (slug, error)
        assert (error.status, error.title, error.detail) == (problem["status"], problem["title"], problem.get("detail"))
        assert error.slug == slug and error.attempts == 1
        assert [e.model_dump() for e in error.errors] == problem.get("errors", [])
    # A field error says where.
    with pytest.raises(Invalid) as caught:
        client.submit_influence(unknown_label)
    assert caught.value.errors[0].loc == ["body", "inputs", 0, "label"]
    with pytest.raises(Invalid) as caught:
        client.list_jobs(status="bogus")  # type: ignore[arg-type]
    assert caught.value.errors[0].loc == ["query", "status"]


def test_the_api_key_is_required_and_sent(service):
    with FastIFClient(service.url, api_key="", poll=FAST_POLL) as keyless, pytest.raises(Unauthorized) as caught:
        keyless.list_models()
    assert caught.value.status == 401 and caught.value.type == PROBLEM + "unauthorized"
    with FastIFClient(service.url, api_key="wrong") as wrong, pytest.raises(Unauthorized):
        wrong.list_jobs()


# -- the async client -------------------------------------------------------------------------------

def test_async_client_does_what_the_sync_one_does(service, client):
    body = {"model_id": service.model.id, "k": 15, "top": 2, "inputs": [{"text": t} for t in TEXTS[:2]]}

    async def scenario() -> tuple[Job, list[Progress], list[dict], list[ResultItem]]:
        seen: list[Progress] = []

        async def record(progress: Progress) -> None:  # an async callback is awaited
            await asyncio.sleep(0)
            seen.append(progress)

        async with AsyncFastIFClient(service.url, api_key=API_KEY, poll=FAST_POLL) as fastif:
            assert service.model.id in [m.id for m in await fastif.list_models()]
            assert (await fastif.get_model(service.model.id)).status == "ready"
            job = await fastif.submit_influence(body)
            done = await fastif.wait_for_job(job.id, timeout=180, on_progress=record)
            raw = [item async for item in fastif.iter_results(job.id, page_size=1)]
            typed = [item async for item in fastif.iter_results(job.id, item_type=ResultItem)]
            assert [item async for item in fastif.stream_results(job.id)] == raw
            assert [i.input_index async for i in fastif.stream_results(job.id, item_type=ResultItem)] == [0, 1]
            with pytest.raises(NotFound) as caught:
                await fastif.get_job("nope")
            assert caught.value.type == PROBLEM + "job-not-found"
            assert job.id in [j.id for j in await fastif.list_jobs(status="succeeded")]
            return done, seen, raw, typed

    done, seen, raw, typed = asyncio.run(scenario())
    assert done.status == "succeeded" and seen and seen[-1] == done.progress
    assert raw == service.raw_items(done.id) == list(client.iter_results(done.id))
    assert [item.input_index for item in typed] == [0, 1]


# -- retries on 503 and 429 (a MockTransport plays the service) -------------------------------------

JOB_LIST = {"items": []}


def _problem(status: int, slug: str, retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers={"content-type": "application/problem+json", **headers},
                          json={"type": PROBLEM + slug, "title": slug, "status": status, "detail": f"{slug} now"})


class Script:
    """Answers each request with the next response of the script, and notes when it came."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.times: list[float] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(time.monotonic())
        self.requests.append(request)
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def test_retries_on_503_and_429_wait_as_long_as_retry_after_says():
    script = Script(_problem(503, "redis-unavailable", "1"), _problem(429, "queue-full", "1"),
                    httpx.Response(200, json=JOB_LIST))
    with FastIFClient("http://fastif.test", api_key="k", retries=3, retry_backoff=0.01,
                      transport=httpx.MockTransport(script)) as fastif:
        assert fastif.list_jobs() == []
    assert len(script.requests) == 3
    assert all(gap >= 0.95 for gap in script.gaps()), script.gaps()  # not the 0.01 s back-off
    assert all(r.headers["X-API-Key"] == "k" for r in script.requests)


def test_retries_are_bounded_and_the_last_answer_is_raised():
    script = Script(_problem(503, "no-workers", "0"))
    with FastIFClient("http://fastif.test", retries=2, transport=httpx.MockTransport(script)) as fastif:
        with pytest.raises(Unavailable) as caught:
            fastif.get_job("j")
    assert len(script.requests) == 3 and caught.value.attempts == 3
    assert caught.value.retry_after == 0 and caught.value.type == PROBLEM + "no-workers"

    # Without a Retry-After: exponential back-off from retry_backoff.
    script = Script(_problem(503, "redis-unavailable", None))
    with FastIFClient("http://fastif.test", retries=2, retry_backoff=0.2, transport=httpx.MockTransport(script)) as fastif:
        with pytest.raises(Unavailable):
            fastif.list_models()
    first, second = script.gaps()
    assert 0.19 <= first < second and second >= 0.39


def test_a_retry_after_past_the_limit_or_another_error_is_raised_at_once():
    script = Script(_problem(429, "queue-full", "30"))
    with FastIFClient("http://fastif.test", retries=5, max_retry_wait=10,
                      transport=httpx.MockTransport(script)) as fastif:
        with pytest.raises(QueueFull) as caught:
            fastif.submit_influence({"model_id": "m", "inputs": [{"text": "x"}]})
    assert len(script.requests) == 1 and caught.value.retry_after == 30 and caught.value.status == 429
    script = Script(_problem(404, "job-not-found", "1"))
    with FastIFClient("http://fastif.test", transport=httpx.MockTransport(script)) as fastif:
        with pytest.raises(NotFound):
            fastif.get_job("j")
    assert len(script.requests) == 1


def test_retry_after_as_an_http_date():
    now = time.time()
    assert retry_after_seconds(formatdate(now + 120, usegmt=True), now=now) == pytest.approx(120, abs=1)
    assert retry_after_seconds(formatdate(now - 50, usegmt=True), now=now) == 0
    assert retry_after_seconds("7") == 7 and retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_async_client_retries_too():
    script = Script(_problem(503, "redis-unavailable", "1"), httpx.Response(200, json=JOB_LIST))

    async def scenario() -> list[Job]:
        async with AsyncFastIFClient("http://fastif.test", retries=1, transport=httpx.MockTransport(script)) as fastif:
            return await fastif.list_jobs()

    assert asyncio.run(scenario()) == []
    assert len(script.requests) == 2 and script.gaps()[0] >= 0.95


def test_url_and_key_come_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("FASTIF_URL", "http://from-env.test:9000/prefix")
    monkeypatch.setenv("FASTIF_API_KEY", "env-key")
    script = Script(httpx.Response(200, json=JOB_LIST))
    with FastIFClient(transport=httpx.MockTransport(script)) as fastif:
        fastif.list_jobs(status="failed", limit=3)
    request = script.requests[0]
    assert str(request.url) == "http://from-env.test:9000/prefix/v1/jobs?limit=3&status=failed"
    assert request.headers["X-API-Key"] == "env-key"
    with FastIFClient("http://given.test", api_key="given", transport=httpx.MockTransport(script)) as fastif:
        fastif.list_jobs()
    assert script.requests[1].url.host == "given.test" and script.requests[1].headers["X-API-Key"] == "given"
    with FastIFClient(api_key="", transport=httpx.MockTransport(script)) as fastif:
        fastif.list_jobs()  # an explicit empty key means none
    assert "X-API-Key" not in script.requests[2].headers


def test_an_answer_that_is_not_problem_json_is_still_typed():
    script = Script(httpx.Response(502, text="<html>Bad gateway</html>"))
    with FastIFClient("http://fastif.test", transport=httpx.MockTransport(script)) as fastif:
        with pytest.raises(FastIFError) as caught:
            fastif.list_models()
    assert caught.value.status == 502 and caught.value.type == "about:blank"
    assert caught.value.detail == "<html>Bad gateway</html>"


# -- the client commands ----------------------------------------------------------------------------

def fastif(service: Service, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("FASTIF_URL", "FASTIF_API_KEY")}
    full_env = {**base, "OMP_NUM_THREADS": "1", "FASTIF_URL": service.url, "FASTIF_API_KEY": API_KEY, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastif_cli.main", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastif: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_models_register_and_submit(service, client, tmp_path):
    listed = fastif(service, "models")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATUS"]
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(service.model.id))
    assert row[1:4] == ["tiny", "ready", "60"]

    registered = fastif(service, "register", "tiny-cli", "--model-path", "model", "--train", "train.jsonl",
                        "--text-field", "text", "--label-field", "label", "--wait", "--timeout", "180")
    assert registered.returncode == 0, registered.stderr
    model_id = registered.stdout.strip()
    assert client.get_model(model_id).status == "ready" and client.get_model(model_id).name == "tiny-cli"
    assert "ready: 60 training examples" in registered.stderr

    submitted = fastif(service, "submit", "--model", model_id, "--text", TEXTS[0], "--text", TEXTS[1],
                       "--kind", "explain", "--k", "20", "--top", "2", "--wait", "--timeout", "180")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    job = client.get_job(job_id)
    assert job.kind == "explain" and job.status == "succeeded" and job.result_count == 2
    # The progress bar's last state, and the closing line.
    assert f"explain {job_id[:8]}: done" in submitted.stderr and f"job {job_id} succeeded" in submitted.stderr

    listed_jobs = fastif(service, "jobs", "--status", "succeeded")
    assert listed_jobs.returncode == 0, listed_jobs.stderr
    assert any(line.startswith(job_id) and " explain " in line for line in listed_jobs.stdout.splitlines())


def test_cli_results_from_a_file_of_inputs(service, client, tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + "\n")
    submitted = fastif(service, "submit", "--model", service.model.id, "--file", str(inputs), "--k", "20")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    client.wait_for_job(job_id, timeout=180)
    raw = service.raw_items(job_id)
    assert len(raw) == len(TEXTS)

    to_stdout = fastif(service, "results", job_id, "--page-size", "2")
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert [json.loads(line) for line in to_stdout.stdout.splitlines()] == raw
    out = tmp_path / "out.jsonl"
    to_file = fastif(service, "results", job_id, "-o", str(out))
    assert to_file.returncode == 0, to_file.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == raw
    assert f"wrote {len(TEXTS)} result item(s)" in to_file.stderr and to_file.stdout == ""


def test_cli_cancel(service, client):
    job = client.submit_influence({"model_id": service.model.id, "inputs": [{"text": "cold and weak"}], "k": 10,
                                   "lissa": {**ENDLESS_LISSA, "seed": 7}})
    cancelled = fastif(service, "cancel", job.id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(job.id)
    with pytest.raises(JobCancelled):
        client.wait_for_job(job.id, timeout=120)
    again = fastif(service, "cancel", job.id)
    assert_one_line_error(again, "409", "cannot be cancelled")


def test_cli_errors_are_one_line_and_exit_non_zero(service, tmp_path):
    assert_one_line_error(fastif(service, "submit", "--model", "nope", "--text", "fine"), "404", "no model nope")
    assert_one_line_error(fastif(service, "results", "nope"), "404", "no job nope")
    assert_one_line_error(fastif(service, "models", env={"FASTIF_API_KEY": "wrong"}), "401")
    assert_one_line_error(fastif(service, "models", "--url", f"http://127.0.0.1:{free_port()}"), "ConnectError")
    assert_one_line_error(fastif(service, "jobs", "--status", "finished"), "--status must be one of")
    assert_one_line_error(fastif(service, "submit", "--model", service.model.id), "--text", "--file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    done = fastif(service, "submit", "--model", service.model.id, "--file", str(bad))
    assert_one_line_error(done, "bad.jsonl:2", "not JSON")
    assert done.returncode == 2
    too_long = fastif(service, "submit", "--model", service.model.id, *[a for _ in range(MAX_INPUTS + 1) for a in ("--text", "x")])
    assert_one_line_error(too_long, "413")
    # The command line's --url and --api-key win over the environment.
    explicit = fastif(service, "models", "--url", service.url, "--api-key", API_KEY,
                      env={"FASTIF_URL": "http://127.0.0.1:9", "FASTIF_API_KEY": "wrong"})
    assert explicit.returncode == 0 and service.model.id in explicit.stdout, explicit.stderr


def test_cli_and_client_run_a_dataset_job_from_a_file_in_the_data_root(service, client, tmp_path):
    write_jsonl(service.root / "dev.jsonl", sentences(20, seed=9))
    submitted = fastif(service, "submit", "--model", service.model.id, "--inputs-from", "dev.jsonl", "--k", "10",
                       "--top", "2", "--wait", "--timeout", "180")
    assert submitted.returncode == 0, submitted.stderr
    job = client.get_job(submitted.stdout.strip())
    assert (job.status, job.inputs_total, job.result_count) == ("succeeded", 20, 20)
    assert f"influence {job.id[:8]}: done" in submitted.stderr
    streamed = list(client.stream_results(job.id, item_type=item_model("influence")))
    assert [item.input_index for item in streamed] == list(range(20))
    # Through the client, with the file's sha256 pinned: a file that differs is refused before anything runs.
    with pytest.raises(Invalid) as refused:
        client.submit_explain({"model_id": service.model.id, "inputs_from": {"path": "dev.jsonl", "sha256": "0" * 64}})
    assert refused.value.status == 422 and "does not match" in refused.value.detail
    scored = fastif(service, "submit", "--model", service.model.id, "--inputs-from", "dev.jsonl", "--kind",
                    "self-influence", "--wait", "--timeout", "180")
    assert scored.returncode == 0, scored.stderr
    items = list(client.iter_results(scored.stdout.strip(), item_type=item_model("self_influence", dataset=True)))
    assert [item.input_index for item in items] == list(range(20))
    bad = service.root / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"sentence": "no text"}\n')
    assert_one_line_error(fastif(service, "submit", "--model", service.model.id, "--inputs-from", "bad.jsonl"),
                          "422", "bad.jsonl, line 2", "'text'")
    assert_one_line_error(fastif(service, "submit", "--model", service.model.id, "--inputs-from", "dev.jsonl",
                                 "--text", "x"), "not with --text")
