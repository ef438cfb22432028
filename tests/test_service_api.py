"""The HTTP contract of service/ against a real Redis: statuses, problem bodies, jobs, auth, paths."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from records.celery_app import make_celery
from records.heartbeat import beat
from records.jobs import JobStore
from records.keys import cache_key
from records.models import ModelStore
from records.settings import settings_from
from service.app import create_app

PROBLEM = "https://fastif.dev/problems/"


def assert_problem(response, status: int, slug: str) -> dict:
    """The response is an RFC 9457 problem with this status and slug."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + slug
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["instance"] == response.request.url.path
    return body


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data root with a dummy model folder and training file (the API only checks paths)."""
    root = tmp_path / "data"
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "models" / "tiny" / "config.json").write_text("{}")
    (root / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    return root


@pytest.fixture
def make_client(redis_client: redis.Redis, redis_url: str, data_root: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: a TestClient on a fresh app over the test Redis DB, with settings overrides."""
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        settings = settings_from(**{"redis_url": redis_url, "data_root": data_root, **overrides})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


MODEL_BODY = {
    "name": "tiny",
    "model_path": "models/tiny",
    "train_data": {"path": "train.jsonl", "text_field": "text", "label_field": "label"},
}


def register(client: TestClient, **changes) -> dict:
    response = client.post("/v1/models", json={**MODEL_BODY, **changes})
    assert response.status_code == 202, response.text
    return response.json()


def ready_model(client: TestClient, redis_client: redis.Redis, labels=("negative", "positive")) -> dict:
    """Register a model and mark it built, as a worker would."""
    model = register(client)
    assert ModelStore(redis_client).set_ready(model["id"], "fp-test", 10, list(labels))
    return model


def influence_body(model_id: str, **changes) -> dict:
    return {"model_id": model_id, "inputs": [{"text": "a fine film", "label": None}], **changes}


def queued_messages(redis_client: redis.Redis, queue: str) -> list[dict]:
    """The Celery messages waiting in a broker queue (no worker runs in these tests)."""
    return [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]


# -- health -------------------------------------------------------------------------------

def test_healthz_touches_nothing(make_client) -> None:
    client = make_client(redis_url="redis://127.0.0.1:1/0")  # no Redis there
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_needs_a_worker_heartbeat(client: TestClient, redis_client: redis.Redis) -> None:
    assert_problem(client.get("/readyz"), 503, "no-workers")
    beat(redis_client, "worker-1", {"queues": ["accel"]})
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["workers"] == 1


def test_readyz_without_redis(make_client) -> None:
    client = make_client(redis_url="redis://127.0.0.1:1/0")
    assert_problem(client.get("/readyz"), 503, "redis-unavailable")


# -- models -------------------------------------------------------------------------------

def test_register_model_records_it_and_sends_the_build_task(client: TestClient, redis_client) -> None:
    response = client.post("/v1/models", json=MODEL_BODY)
    assert response.status_code == 202
    model = response.json()
    assert response.headers["location"] == f"/v1/models/{model['id']}"
    assert model["status"] == "building"
    assert model["request"]["influence"] == {"params": "auto", "weight_decay": 0.0, "max_length": 128}
    assert model["build_job_id"]

    build_job = client.get(f"/v1/jobs/{model['build_job_id']}").json()
    assert (build_job["kind"], build_job["status"], build_job["model_id"]) == ("build_model", "queued", model["id"])

    [message] = queued_messages(redis_client, "cpu")
    assert message["content-type"] == "application/json"  # never pickle
    assert message["headers"]["task"] == "fastif.build_model"
    assert message["headers"]["id"] == model["build_job_id"]
    args = json.loads(base64.b64decode(message["body"]))[0]
    assert args == [model["id"]]
    assert queued_messages(redis_client, "accel") == []

    assert client.get(f"/v1/models/{model['id']}").json()["id"] == model["id"]
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [model["id"]]


def test_unknown_model_is_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/models/nope"), 404, "model-not-found")
    assert_problem(client.delete("/v1/models/nope"), 404, "model-not-found")


def test_delete_model_forgets_it_and_its_caches(client: TestClient, redis_client) -> None:
    model = ready_model(client, redis_client)
    own = cache_key("fp-test", "grad", {"text": "a"})
    other = cache_key("fp-other", "grad", {"text": "a"})
    redis_client.set(own, b"x")
    redis_client.set(other, b"x")
    response = client.delete(f"/v1/models/{model['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(client.get(f"/v1/models/{model['id']}"), 404, "model-not-found")
    assert not redis_client.exists(own)
    assert redis_client.exists(other)


def test_deleting_a_building_model_cancels_its_build(client: TestClient) -> None:
    model = register(client)
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{model['build_job_id']}").json()["status"] == "cancelled"


def test_model_paths_are_stored_relative_to_the_data_root(client: TestClient, data_root: Path) -> None:
    model = register(client, model_path=str(data_root / "models" / "tiny"),
                     train_data={"path": "./train.jsonl"})
    assert model["request"]["model_path"] == "models/tiny"
    assert model["request"]["train_data"]["path"] == "train.jsonl"


@pytest.fixture
def escape_links(data_root: Path, tmp_path: Path) -> None:
    """Symlinks inside the data root that point outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (data_root / "link_out").symlink_to(outside)
    (data_root / "link_file").symlink_to(outside / "secret.txt")


OUTSIDE = "path-outside-data-root"
MISSING = "path-not-found"
TRAVERSALS = [
    ("..", OUTSIDE),
    ("../../etc/passwd", OUTSIDE),
    ("models/../../etc/passwd", OUTSIDE),
    ("models/tiny/../../..", OUTSIDE),
    ("models/..", OUTSIDE),  # resolves inside, but `..` is refused outright
    ("/etc/passwd", OUTSIDE),
    ("/", OUTSIDE),
    ("/tmp", OUTSIDE),
    ("link_out", OUTSIDE),
    ("link_out/secret.txt", OUTSIDE),
    ("link_file", OUTSIDE),
    ("models/tiny\x00/../../etc", OUTSIDE),
    ("%2e%2e/%2e%2e/etc/passwd", MISSING),  # no URL-decoding: a literal (missing) name
    ("..%2f..%2fetc%2fpasswd", MISSING),
    ("..\\..\\etc\\passwd", MISSING),  # a backslash is part of a file name on POSIX
    ("~/.ssh/id_rsa", MISSING),
    ("models/absent", MISSING),
]


@pytest.mark.usefixtures("escape_links")
@pytest.mark.parametrize(("path", "slug"), TRAVERSALS)
@pytest.mark.parametrize("field", ["model_path", "train_data.path"])
def test_paths_must_stay_inside_the_data_root(client: TestClient, redis_client, data_root: Path, field: str, path: str,
                                             slug: str) -> None:
    body = json.loads(json.dumps(MODEL_BODY))
    if field == "model_path":
        body["model_path"] = path
    else:
        body["train_data"]["path"] = path
    problem = assert_problem(client.post("/v1/models", json=body), 422, slug)
    assert problem["errors"][0]["loc"] == ["body", *field.split(".")]
    assert str(data_root) not in json.dumps(problem)  # the server's layout does not leak
    assert client.get("/v1/models").json()["items"] == []
    assert queued_messages(redis_client, "cpu") == []


def test_absolute_outside_path_in_tmp(client: TestClient, tmp_path: Path) -> None:
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    assert_problem(client.post("/v1/models", json={**MODEL_BODY, "model_path": str(sibling)}), 422, OUTSIDE)
    # A prefix trick: "<root>-evil" starts with the root's string but is not inside it.
    evil = Path(str(tmp_path / "data") + "-evil")
    evil.mkdir()
    assert_problem(client.post("/v1/models", json={**MODEL_BODY, "model_path": str(evil)}), 422, OUTSIDE)


# -- influence ----------------------------------------------------------------------------

def test_influence_job_is_queued_then_cancelled(client: TestClient, redis_client) -> None:
    model = ready_model(client, redis_client)
    response = client.post("/v1/influence", json=influence_body(model["id"]))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["kind"], job["status"], job["model_id"], job["deliveries"]) == ("influence", "queued", model["id"], 0)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"

    [message] = queued_messages(redis_client, "accel")
    assert message["headers"]["task"] == "fastif.influence"
    assert json.loads(base64.b64decode(message["body"]))[0] == [job["id"]]
    # The stored request has the defaults filled in: EK-FAC on the Gauss-Newton matrix, λ of each block 10 × its
    # mean eigenvalue, the same defaults as the engine's.
    from fastif.config import SolverConfig

    stored = JobStore(redis_client).request(job["id"])
    engine_default = SolverConfig()
    assert (stored["solver"], stored["curvature"], stored["damping"], stored["damping_scope"], stored["damping_ratio"]) == (
        engine_default.solver, engine_default.curvature, None, engine_default.damping_scope, engine_default.damping_ratio)
    assert stored["damping_scope"] == "block" and stored["damping_ratio"] == 10.0
    assert stored["lissa"]["damp"] is None and stored["lissa"]["scale"] is None

    assert_problem(client.get(f"/v1/jobs/{job['id']}/results"), 409, "job-not-finished")
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job-not-cancellable")
    assert_problem(client.get(f"/v1/jobs/{job['id']}/results"), 409, "job-not-finished")


def test_cancel_of_a_running_job_sets_the_flag(client: TestClient, redis_client) -> None:
    model = ready_model(client, redis_client)
    job_id = client.post("/v1/influence", json=influence_body(model["id"])).json()["id"]
    jobs = JobStore(redis_client)
    assert jobs.start_delivery(job_id) == 1
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["cancel_requested"]) == ("running", True)
    assert jobs.cancel_requested(job_id)


def test_influence_model_checks(client: TestClient, redis_client) -> None:
    assert_problem(client.post("/v1/influence", json=influence_body("nope")), 404, "model-not-found")
    building = register(client)
    assert_problem(client.post("/v1/influence", json=influence_body(building["id"])), 409, "model-not-ready")
    failed = register(client)
    ModelStore(redis_client).set_failed(failed["id"], "bad-data", "no label column")
    assert_problem(client.post("/v1/influence", json=influence_body(failed["id"])), 409, "model-not-ready")


@pytest.mark.parametrize("label", ["neutral", 2, 7])
def test_unknown_labels_are_422(client: TestClient, redis_client, label) -> None:
    model = ready_model(client, redis_client)
    body = influence_body(model["id"], inputs=[{"text": "x", "label": "positive"}, {"text": "y", "label": label}])
    problem = assert_problem(client.post("/v1/influence", json=body), 422, "unknown-label")
    assert problem["errors"][0]["loc"] == ["body", "inputs", 1, "label"]


@pytest.mark.parametrize("label", ["negative", "positive", 0, 1, None])
def test_known_labels_are_accepted(client: TestClient, redis_client, label) -> None:
    model = ready_model(client, redis_client)
    body = influence_body(model["id"], inputs=[{"text": "x", "label": label}])
    assert client.post("/v1/influence", json=body).status_code == 202


def test_input_limits_are_413(make_client, redis_client) -> None:
    client = make_client(max_inputs=3, max_text_chars=20)
    model = ready_model(client, redis_client)
    many = influence_body(model["id"], inputs=[{"text": "x"}] * 4)
    assert_problem(client.post("/v1/influence", json=many), 413, "too-many-inputs")
    assert client.post("/v1/influence", json={**many, "inputs": many["inputs"][:3]}).status_code == 202
    long_text = influence_body(model["id"], inputs=[{"text": "x" * 21}])
    assert_problem(client.post("/v1/influence", json=long_text), 413, "text-too-long")
    long_pair = influence_body(model["id"], inputs=[{"text": "x", "text_pair": "y" * 21}])
    assert_problem(client.post("/v1/influence", json=long_pair), 413, "text-too-long")


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"inputs": []}, ["body", "inputs"]),
        ({"inputs": [{"text": ""}]}, ["body", "inputs", 0, "text"]),
        ({"inputs": [{"text": "x", "label": True}]}, ["body", "inputs", 0, "label"]),
        ({"k": 0}, ["body", "k"]),
        ({"top": 1001}, ["body", "top"]),
        ({"lissa": {"damp": 1.5}}, ["body", "lissa", "damp"]),
        ({"lissa": {"scale": 0}}, ["body", "lissa", "scale"]),
        ({"lissa": {"depth": 0}}, ["body", "lissa", "depth"]),
        ({"solver": "newton"}, ["body", "solver"]),
        ({"parallel": 65}, ["body", "parallel"]),
        ({"surprise": 1}, ["body", "surprise"]),
    ],
)
def test_invalid_influence_bodies_are_422(client: TestClient, changes: dict, where: list) -> None:
    problem = assert_problem(client.post("/v1/influence", json=influence_body("m", **changes)), 422, "invalid-request")
    assert any(error["loc"][: len(where)] == where for error in problem["errors"])
    assert all(set(error) == {"loc", "msg", "type"} for error in problem["errors"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422(client: TestClient, literal: str) -> None:
    raw = '{"model_id": "m", "inputs": [{"text": "x"}], "lissa": {"scale": %s}}' % literal
    response = client.post("/v1/influence", content=raw, headers={"content-type": "application/json"})
    problem = assert_problem(response, 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["body", "lissa", "scale"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/influence", content='{"model_id": ', headers={"content-type": "application/json"})
    assert_problem(response, 400, "malformed-json")


def test_idempotency_key(client: TestClient, redis_client) -> None:
    model = ready_model(client, redis_client)
    body = influence_body(model["id"])
    first = client.post("/v1/influence", json=body, headers={"Idempotency-Key": "abc-1"})
    again = client.post("/v1/influence", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert len(queued_messages(redis_client, "accel")) == 1  # the replay sent nothing

    # Spelling out a default is the same request.
    explicit = {**body, "k": 1000, "top": 10}
    assert client.post("/v1/influence", json=explicit, headers={"Idempotency-Key": "abc-1"}).json()["id"] == first.json()["id"]

    other = client.post("/v1/influence", json={**body, "top": 5}, headers={"Idempotency-Key": "abc-1"})
    assert_problem(other, 422, "idempotency-conflict")

    no_key = [client.post("/v1/influence", json=body).json()["id"] for _ in range(2)]
    assert len({first.json()["id"], *no_key}) == 3
    assert_problem(client.post("/v1/influence", json=body, headers={"Idempotency-Key": "x" * 256}), 422, "invalid-request")


def test_queue_full_is_429(make_client, redis_client) -> None:
    client = make_client(max_queued_jobs=2)
    model = ready_model(client, redis_client)  # its build job counts as queued: one slot left
    assert client.post("/v1/influence", json=influence_body(model["id"])).status_code == 202
    response = client.post("/v1/influence", json=influence_body(model["id"]))
    assert_problem(response, 429, "queue-full")
    assert int(response.headers["retry-after"]) > 0
    assert_problem(client.post("/v1/models", json=MODEL_BODY), 429, "queue-full")
    assert len(client.get("/v1/models").json()["items"]) == 1  # the refused model left no record


# -- jobs -------------------------------------------------------------------------------------

def test_unknown_job_is_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/nope"), 404, "job-not-found")
    assert_problem(client.get("/v1/jobs/nope/results"), 404, "job-not-found")
    assert_problem(client.post("/v1/jobs/nope/cancel"), 404, "job-not-found")


def test_results_are_paginated_in_input_order(client: TestClient, redis_client) -> None:
    jobs = JobStore(redis_client)
    job = jobs.create("influence", "m", {"n": 7})
    jobs.start_delivery(job.id)
    items = [{"input_index": i, "label_used": "positive"} for i in range(7)]
    assert jobs.succeed(job.id, items)

    page = client.get(f"/v1/jobs/{job.id}/results", params={"offset": 0, "limit": 3}).json()
    assert (page["job_id"], page["offset"], page["limit"], page["total"]) == (job.id, 0, 3, 7)
    assert [item["input_index"] for item in page["items"]] == [0, 1, 2]
    page = client.get(f"/v1/jobs/{job.id}/results", params={"offset": 5, "limit": 3}).json()
    assert [item["input_index"] for item in page["items"]] == [5, 6]
    assert client.get(f"/v1/jobs/{job.id}/results", params={"offset": 9}).json()["items"] == []
    assert [i["input_index"] for i in client.get(f"/v1/jobs/{job.id}/results").json()["items"]] == list(range(7))
    assert client.get(f"/v1/jobs/{job.id}/results?offset=&limit=").json()["total"] == 7

    assert_problem(client.get(f"/v1/jobs/{job.id}/results", params={"limit": 1001}), 422, "invalid-request")
    assert_problem(client.get(f"/v1/jobs/{job.id}/results", params={"limit": 0}), 422, "invalid-request")
    assert_problem(client.get(f"/v1/jobs/{job.id}/results", params={"offset": -1}), 422, "invalid-request")

    finished = client.get(f"/v1/jobs/{job.id}").json()
    assert (finished["status"], finished["result_count"]) == ("succeeded", 7)


def test_failed_job_reports_its_error(client: TestClient, redis_client) -> None:
    jobs = JobStore(redis_client)
    job = jobs.create("influence", "m", {})
    jobs.fail(job.id, "lissa-diverged", "raise scale")
    body = client.get(f"/v1/jobs/{job.id}").json()
    assert body["status"] == "failed"
    assert body["error"] == {"code": "lissa-diverged", "message": "raise scale"}
    assert_problem(client.get(f"/v1/jobs/{job.id}/results"), 409, "job-not-finished")


def test_list_jobs_filters_by_status(client: TestClient, redis_client) -> None:
    jobs = JobStore(redis_client)
    ids = [jobs.create("influence", "m", {"i": i}).id for i in range(4)]
    jobs.request_cancel(ids[1])
    listed = client.get("/v1/jobs").json()["items"]
    assert [job["id"] for job in listed] == ids[::-1]  # newest first
    assert [job["id"] for job in client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]] == [ids[1]]
    assert len(client.get("/v1/jobs", params={"limit": 2}).json()["items"]) == 2
    assert len(client.get("/v1/jobs?status=&limit=").json()["items"]) == 4  # empty means unset
    assert_problem(client.get("/v1/jobs", params={"status": "done"}), 422, "invalid-request")
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422, "invalid-request")


# -- generic errors ---------------------------------------------------------------------------

def test_unknown_route_and_method(client: TestClient) -> None:
    assert_problem(client.get("/v2/nothing"), 404, "not-found")
    response = client.delete("/v1/jobs")
    assert_problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["allow"]


def test_unhandled_exception_is_a_500_problem(client: TestClient) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/boom", boom)
    body = assert_problem(client.get("/boom"), 500, "internal-error")
    assert "secret" not in json.dumps(body)


def test_body_too_large_by_content_length(make_client) -> None:
    client = make_client(max_body_bytes=200)
    response = client.post("/v1/influence", content=b"{" + b" " * 300 + b"}",
                           headers={"content-type": "application/json"})
    assert_problem(response, 413, "body-too-large")


def test_body_too_large_when_streamed_without_length(make_client) -> None:
    client = make_client(max_body_bytes=200)

    def chunks():
        yield b'{"model_id": "m", "inputs": ['
        for _ in range(20):
            yield b'{"text": "xxxxxxxxxxxxxxxxxxxx"},'
        yield b'{"text": "x"}]}'

    response = client.post("/v1/influence", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body-too-large")


# -- auth -------------------------------------------------------------------------------------

def test_api_keys(make_client, redis_client) -> None:
    client = make_client(api_keys=["key-one", "key-two"])
    for path in ("/v1/models", "/v1/jobs", "/metrics"):
        missing = assert_problem(client.get(path), 401, "unauthorized")
        assert "missing" in missing["detail"]
        assert_problem(client.get(path, headers={"X-API-Key": "key-on"}), 401, "unauthorized")
        assert_problem(client.get(path, headers={"X-API-Key": "key-one "}), 401, "unauthorized")
        assert client.get(path, headers={"X-API-Key": "key-one"}).status_code == 200
        assert client.get(path, headers={"X-API-Key": "key-two"}).status_code == 200
    assert_problem(client.post("/v1/influence", json=influence_body("m")), 401, "unauthorized")
    assert_problem(client.post("/v1/jobs/x/cancel"), 401, "unauthorized")
    assert client.get("/healthz").status_code == 200
    beat(redis_client, "w", {})
    assert client.get("/readyz").status_code == 200


def test_no_keys_means_no_auth(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "anything"}).status_code == 200


def test_api_keys_from_the_environment(monkeypatch) -> None:
    from records.settings import Settings

    monkeypatch.setenv("FASTIF_API_KEYS", "a, b,,")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/2")
    monkeypatch.setenv("FASTIF_MAX_INPUTS", "5")
    settings = Settings()
    assert settings.api_keys == ["a", "b"]
    assert settings.redis_url == "redis://example:6379/2"
    assert settings.max_inputs == 5
    assert settings.state_dir == settings.data_root / ".fastif"
    monkeypatch.setenv("FASTIF_API_KEYS", "")
    assert Settings().api_keys == []


# -- metrics ----------------------------------------------------------------------------------

def test_metrics(client: TestClient, redis_client) -> None:
    model = ready_model(client, redis_client)
    job_id = client.post("/v1/influence", json=influence_body(model["id"])).json()["id"]
    client.get(f"/v1/jobs/{job_id}")
    client.get("/v1/jobs/unknown-id")
    client.get("/no/such/route")
    beat(redis_client, "w", {})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'fastif_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'fastif_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "fastif_http_request_duration_seconds_bucket" in text
    assert 'fastif_jobs{status="queued"} 2.0' in text  # the build job and the influence job
    assert "fastif_workers_alive 1.0" in text
    assert "fastif_redis_up 1.0" in text
    assert job_id not in text  # no per-id labels


def test_metrics_without_redis(make_client) -> None:
    client = make_client(redis_url="redis://127.0.0.1:1/0")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "fastif_redis_up 0.0" in response.text


# -- Redis outages: 503 redis-unavailable (never 500, never a hang), no orphan jobs, self-healing

DEAD_REDIS = "redis://127.0.0.1:1/0"


def _client(redis_url: str, data_root: Path) -> TestClient:
    settings = settings_from(redis_url=redis_url, data_root=data_root)
    return TestClient(create_app(settings), raise_server_exceptions=False)


def test_every_redis_route_is_503_when_redis_is_down(data_root: Path) -> None:
    with _client(DEAD_REDIS, data_root) as client:
        start = time.monotonic()
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/x", None),
            ("DELETE", "/v1/models/x", None),
            ("POST", "/v1/models", MODEL_BODY),
            ("POST", "/v1/influence", influence_body("m")),
            ("GET", "/v1/jobs", None),
            ("GET", "/v1/jobs/x", None),
            ("GET", "/v1/jobs/x/results", None),
            ("POST", "/v1/jobs/x/cancel", None),
        ]:
            response = client.request(method, path, json=body)
            assert_problem(response, 503, "redis-unavailable")
            assert response.headers["retry-after"]
        assert time.monotonic() - start < 10  # fails fast, no long hang


def test_a_failed_send_fails_the_job(redis_client, redis_url: str, data_root: Path) -> None:
    with _client(redis_url, data_root) as client:
        # Job records reach Redis, but the broker does not answer.
        client.app.state.celery = make_celery(settings_from(redis_url=DEAD_REDIS))
        start = time.monotonic()
        assert_problem(client.post("/v1/models", json=MODEL_BODY), 503, "redis-unavailable")
        assert time.monotonic() - start < 10
        [model] = client.get("/v1/models").json()["items"]
        assert model["status"] == "failed"
        assert model["error"]["code"] == "redis-unavailable"
        build = client.get(f"/v1/jobs/{model['build_job_id']}").json()
        assert (build["status"], build["error"]["code"]) == ("failed", "redis-unavailable")

        ModelStore(redis_client).set_ready(model["id"], "fp", 3, ["a", "b"])
        assert_problem(client.post("/v1/influence", json=influence_body(model["id"])), 503, "redis-unavailable")
        jobs = client.get("/v1/jobs", params={"status": "queued"}).json()["items"]
        assert jobs == []  # nothing is left queued without a message behind it
        [failed] = [j for j in client.get("/v1/jobs").json()["items"] if j["kind"] == "influence"]
        assert (failed["status"], failed["error"]["code"]) == ("failed", "redis-unavailable")

        # A retry with the same Idempotency-Key, once the broker is back, starts the job instead of replaying the failure.
        keyed = {"Idempotency-Key": "retry-after-503"}
        assert_problem(client.post("/v1/influence", json=influence_body(model["id"]), headers=keyed), 503,
                       "redis-unavailable")
        client.app.state.celery = make_celery(settings_from(redis_url=redis_url))
        retried = client.post("/v1/influence", json=influence_body(model["id"]), headers=keyed)
        assert retried.status_code == 202 and retried.json()["status"] == "queued", retried.text
        assert client.post("/v1/influence", json=influence_body(model["id"]), headers=keyed).json()["id"] == \
            retried.json()["id"]  # and from then on the key replays that job


def test_the_app_recovers_when_redis_comes_back(redis_process, unused_tcp_port: int, data_root: Path) -> None:
    port = unused_tcp_port
    server = redis_process(port)
    with _client(f"redis://127.0.0.1:{port}/0", data_root) as client:
        assert client.get("/v1/jobs").status_code == 200
        server.terminate()
        server.wait(timeout=5)
        assert_problem(client.get("/v1/jobs"), 503, "redis-unavailable")
        assert_problem(client.get("/readyz"), 503, "redis-unavailable")
        redis_process(port)
        # The very first call after the restart succeeds: no restart of the API needed.
        assert client.get("/v1/jobs").status_code == 200
        assert client.post("/v1/models", json=MODEL_BODY).status_code == 202


def test_the_openapi_document_describes_every_kind_of_result_item(client: TestClient) -> None:
    """Clients validate result items against these components; each is the api_schemas model the workers validate with."""
    from api_schemas import CorrectionReport

    components = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("ResultItem", "ExplainItem", "GraphResult", "CorrectionReport", "SelfInfluenceItem", "QualityReport"):
        assert components[name]["type"] == "object", name
    report = components["CorrectionReport"]["properties"]
    assert set(report) == set(CorrectionReport.model_fields)
    strategy = components["StrategyReport"]["properties"]
    assert {"by_round", "trials", "delta_accuracy", "control"} <= set(strategy)
    assert components["RoundReport"]["properties"]["confusion"]["type"] == "array"


def test_results_jsonl_streams_every_item_in_input_order(client: TestClient, redis_client) -> None:
    jobs = JobStore(redis_client)
    job = jobs.create("influence", "m", {"n": 1234})
    assert_problem(client.get(f"/v1/jobs/{job.id}/results.jsonl"), 409, "job-not-finished")
    jobs.start_delivery(job.id)
    items = [{"input_index": i, "label_used": "positive", "text": f"ünïcode {i}\nnew line"} for i in range(1234)]
    assert jobs.succeed(job.id, items)

    with client.stream("GET", f"/v1/jobs/{job.id}/results.jsonl") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/jsonl")
        assert response.headers["content-disposition"] == f'attachment; filename="{job.id}.results.jsonl"'
        lines = list(response.iter_lines())
    assert len(lines) == 1234 and [json.loads(line) for line in lines] == items
    assert "ünïcode 0" in lines[0]  # UTF-8 as written, not \u escapes: a reader of the file sees the text
    paged = client.get(f"/v1/jobs/{job.id}/results", params={"limit": 1000}).json()["items"]
    assert [json.loads(line) for line in lines[:1000]] == paged
    assert_problem(client.get("/v1/jobs/nope/results.jsonl"), 404, "job-not-found")


def test_the_stream_reads_redis_a_chunk_at_a_time(redis_client) -> None:
    """The body is never built whole: the first item goes out after one chunk has been read."""
    jobs = JobStore(redis_client)
    job = jobs.create("influence", "m", {"n": 1100})
    jobs.start_delivery(job.id)
    assert jobs.succeed(job.id, [{"input_index": i} for i in range(1100)])
    reads = []
    original = jobs.redis.lrange
    jobs.redis.lrange = lambda key, start, end: reads.append((start, end)) or original(key, start, end)
    stream = jobs.iter_raw_results(job.id, chunk=500)
    assert json.loads(next(stream)) == {"input_index": 0}
    assert reads == [(0, 499)]
    rest = list(stream)
    assert len(rest) == 1099 and reads == [(0, 499), (500, 999), (1000, 1099)]


def test_output_path_is_resolved_in_the_data_root_or_refused(client: TestClient, redis_client, data_root: Path) -> None:
    model = ready_model(client, redis_client)
    (data_root / "results").mkdir()
    cases = [("../outside.jsonl", 422, "path-outside-data-root"), ("/etc/out.jsonl", 422, "path-outside-data-root"),
             ("results", 422, "invalid-request"), ("no-such-folder/out.jsonl", 422, "path-not-found")]
    for path in ("/v1/influence", "/v1/explain"):
        for raw, status, slug in cases:
            body = assert_problem(client.post(path, json=influence_body(model["id"], output_path=raw)), status, slug)
            assert body["errors"][0]["loc"] == ["body", "output_path"] and str(data_root) not in body["detail"]
    refused = client.post("/v1/self-influence", json={"model_id": model["id"], "sample": 2, "output_path": "../x"})
    assert_problem(refused, 422, "path-outside-data-root")
    assert JobStore(redis_client).list() == [j for j in JobStore(redis_client).list() if j.kind == "build_model"]
    accepted = client.post("/v1/influence", json=influence_body(model["id"], output_path="./results/../results/a.jsonl"))
    assert_problem(accepted, 422, "path-outside-data-root")  # `..` is refused outright, even when it stays inside
    accepted = client.post("/v1/influence", json=influence_body(model["id"], output_path="./results/a.jsonl"))
    assert accepted.status_code == 202
    assert JobStore(redis_client).request(accepted.json()["id"])["output_path"] == "results/a.jsonl"
