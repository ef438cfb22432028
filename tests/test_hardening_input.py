"""Bad input, as a matrix: each case is answered 4xx with a problem+json body of one exact type.

Against the real app and a real Redis DB (the API's own checks: schema, limits, the model's
state and labels, ids). The default limits apply: 64 inputs, 4,000 characters, 1 MB bodies.
test_service_api.py checks the details of several of these (field locations, headers);
this file is the breadth: every kind of bad request a client can send, one line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from records.jobs import JobStore
from records.models import ModelStore
from records.settings import settings_from
from service.app import create_app

PROBLEM = "https://fastif.dev/problems/"
JSON = {"content-type": "application/json"}
LIMITS = {"max_inputs": 64, "max_text_chars": 4000, "max_body_bytes": 1_000_000}


@pytest.fixture
def world(redis_client: redis.Redis, redis_url: str, tmp_path: Path):
    """A client, a ready model (labels negative/positive), a building model, and jobs."""
    root = tmp_path / "data"
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "models" / "tiny" / "config.json").write_text("{}")
    (root / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    app = create_app(settings_from(redis_url=redis_url, data_root=root, **LIMITS))
    with TestClient(app, raise_server_exceptions=False) as client:
        body = {"name": "tiny", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"}}
        ready = client.post("/v1/models", json=body).json()["id"]
        building = client.post("/v1/models", json=body).json()["id"]
        ModelStore(redis_client).set_ready(ready, "fp-input", 10, ["negative", "positive"])
        jobs = JobStore(redis_client)
        queued = jobs.create("influence", ready, {"q": 1}).id
        done = jobs.create("influence", ready, {"q": 2}).id
        jobs.start_delivery(done)
        jobs.succeed(done, [{"input_index": 0}])
        ids = {"ready": ready, "building": building, "queued": queued, "done": done}
        yield client, ids


def influence(**changes) -> dict:
    """A valid influence body for the ready model, changed."""
    return {"model_id": "{ready}", "inputs": [{"text": "a fine film"}], **changes}


def raw(text: str) -> dict:
    """Send this exact text as an application/json body."""
    return {"content": text, "headers": JSON}


VALID = json.dumps(influence())
POST_INF = ("POST", "/v1/influence")

# (id, method, path, request kwargs, status, problem slug)
CASES = [
    # -- not JSON at all, or not the JSON we want
    ("malformed-json", *POST_INF, raw('{"model_id": '), 400, "malformed-json"),
    ("trailing-garbage", *POST_INF, raw(VALID + " x"), 400, "malformed-json"),
    ("single-quotes", *POST_INF, raw("{'model_id': 'm'}"), 400, "malformed-json"),
    ("invalid-utf8", *POST_INF, {"content": b'{"model_id": "\xff\xfe", "inputs": []}', "headers": JSON}, 400,
     "bad-request"),
    ("nested-100k-deep", *POST_INF, raw("[" * 100_000 + "]" * 100_000), 400, "bad-request"),
    ("5000-digit-integer", *POST_INF, raw(VALID[:-1] + ', "k": ' + "9" * 5000 + "}"), 400, "bad-request"),
    ("empty-body", *POST_INF, raw(""), 422, "invalid-request"),
    ("null-body", *POST_INF, raw("null"), 422, "invalid-request"),
    ("array-body", *POST_INF, raw("[]"), 422, "invalid-request"),
    ("string-body", *POST_INF, raw('"hello"'), 422, "invalid-request"),
    ("text-plain-content-type", *POST_INF, {"content": VALID, "headers": {"content-type": "text/plain"}}, 422,
     "invalid-request"),
    ("form-encoded", *POST_INF, {"data": {"model_id": "{ready}"}}, 422, "invalid-request"),
    ("huge-body-2MB", *POST_INF, raw(json.dumps(influence(inputs=[{"text": "x" * 2_000_000}]))), 413,
     "body-too-large"),
    # -- wrong types and shapes
    ("model-id-number", *POST_INF, {"json": influence(model_id=123)}, 422, "invalid-request"),
    ("model-id-too-long", *POST_INF, {"json": influence(model_id="m" * 129)}, 422, "invalid-request"),
    ("missing-inputs", *POST_INF, {"json": {"model_id": "{ready}"}}, 422, "invalid-request"),
    ("inputs-not-a-list", *POST_INF, {"json": influence(inputs="a fine film")}, 422, "invalid-request"),
    ("inputs-empty", *POST_INF, {"json": influence(inputs=[])}, 422, "invalid-request"),
    ("text-empty", *POST_INF, {"json": influence(inputs=[{"text": ""}])}, 422, "invalid-request"),
    ("text-number", *POST_INF, {"json": influence(inputs=[{"text": 5}])}, 422, "invalid-request"),
    ("text-null", *POST_INF, {"json": influence(inputs=[{"text": None}])}, 422, "invalid-request"),
    ("input-unknown-field", *POST_INF, {"json": influence(inputs=[{"text": "x", "txt": "y"}])}, 422,
     "invalid-request"),
    ("body-unknown-field", *POST_INF, {"json": influence(surprise=1)}, 422, "invalid-request"),
    ("k-as-string", *POST_INF, {"json": influence(k="5")}, 422, "invalid-request"),
    ("k-as-bool", *POST_INF, {"json": influence(k=True)}, 422, "invalid-request"),
    ("k-fractional", *POST_INF, {"json": influence(k=1.5)}, 422, "invalid-request"),
    ("k-negative", *POST_INF, {"json": influence(k=-3)}, 422, "invalid-request"),
    ("top-zero", *POST_INF, {"json": influence(top=0)}, 422, "invalid-request"),
    ("solver-unknown", *POST_INF, {"json": influence(solver="newton")}, 422, "invalid-request"),
    ("curvature-unknown", *POST_INF, {"json": influence(curvature="fisher-ish")}, 422, "invalid-request"),
    ("ekfac-on-the-hessian", *POST_INF, {"json": influence(solver="ekfac", curvature="hessian")}, 422, "invalid-request"),
    ("damping-negative", *POST_INF, {"json": influence(damping=-1)}, 422, "invalid-request"),
    ("damping-ratio-zero", *POST_INF, {"json": influence(damping_ratio=0)}, 422, "invalid-request"),
    ("lissa-damp-without-scale", *POST_INF, {"json": influence(solver="lissa", lissa={"damp": 0.01})}, 422,
     "invalid-request"),
    ("damping-and-lissa-knobs", *POST_INF, {"json": influence(damping=1.0, lissa={"damp": 0.01, "scale": 10})}, 422,
     "invalid-request"),
    ("lissa-knobs-ekfac-hessian", *POST_INF, {"json": influence(solver="ekfac", curvature="hessian",
                                                                lissa={"damp": 0.01, "scale": 10})}, 422, "invalid-request"),
    ("parallel-with-ekfac", *POST_INF, {"json": influence(parallel=2)}, 422, "invalid-request"),
    ("cg-tol-zero", *POST_INF, {"json": influence(solver="cg", cg={"tol": 0})}, 422, "invalid-request"),
    ("parallel-zero", *POST_INF, {"json": influence(parallel=0)}, 422, "invalid-request"),
    ("parallel-1000", *POST_INF, {"json": influence(parallel=1000)}, 422, "invalid-request"),
    # -- absurd LiSSA settings
    ("lissa-scale-zero", *POST_INF, {"json": influence(lissa={"scale": 0})}, 422, "invalid-request"),
    ("lissa-scale-negative", *POST_INF, {"json": influence(lissa={"scale": -1e4})}, 422, "invalid-request"),
    ("lissa-depth-1e9", *POST_INF, {"json": influence(lissa={"depth": 10**9})}, 422, "invalid-request"),
    ("lissa-depth-zero", *POST_INF, {"json": influence(lissa={"depth": 0})}, 422, "invalid-request"),
    ("lissa-damp-zero", *POST_INF, {"json": influence(lissa={"damp": 0, "scale": 1e4})}, 422, "invalid-request"),
    ("lissa-damp-one", *POST_INF, {"json": influence(lissa={"damp": 1, "scale": 1e4})}, 422, "invalid-request"),
    ("lissa-batch-size-zero", *POST_INF, {"json": influence(lissa={"batch_size": 0})}, 422, "invalid-request"),
    ("lissa-batch-size-1e6", *POST_INF, {"json": influence(lissa={"batch_size": 10**6})}, 422, "invalid-request"),
    ("lissa-repeats-1000", *POST_INF, {"json": influence(lissa={"repeats": 1000})}, 422, "invalid-request"),
    ("lissa-seed-1e20", *POST_INF, {"json": influence(lissa={"seed": 10**20})}, 422, "invalid-request"),
    ("lissa-seed-negative", *POST_INF, {"json": influence(lissa={"seed": -1})}, 422, "invalid-request"),
    ("lissa-not-an-object", *POST_INF, {"json": influence(lissa=[1, 2])}, 422, "invalid-request"),
    ("lissa-unknown-knob", *POST_INF, {"json": influence(lissa={"temperature": 2})}, 422, "invalid-request"),
    # -- numbers JSON has no name for
    ("scale-NaN", *POST_INF, raw(VALID[:-1] + ', "lissa": {"scale": NaN}}'), 422, "invalid-request"),
    ("damp-Infinity", *POST_INF, raw(VALID[:-1] + ', "lissa": {"damp": Infinity}}'), 422, "invalid-request"),
    ("scale-minus-Infinity", *POST_INF, raw(VALID[:-1] + ', "lissa": {"scale": -Infinity}}'), 422, "invalid-request"),
    ("scale-1e400-overflows", *POST_INF, raw(VALID[:-1] + ', "lissa": {"scale": 1e400}}'), 422, "invalid-request"),
    # -- limits of this deployment
    ("too-many-inputs", *POST_INF, {"json": influence(inputs=[{"text": "x"}] * 65)}, 413, "too-many-inputs"),
    ("text-too-long", *POST_INF, {"json": influence(inputs=[{"text": "x" * 4001}])}, 413, "text-too-long"),
    ("text-pair-too-long", *POST_INF, {"json": influence(inputs=[{"text": "x", "text_pair": "y" * 4001}])}, 413,
     "text-too-long"),
    # -- the model: unknown, not ready, labels it does not have
    ("unknown-model", *POST_INF, {"json": influence(model_id="no-such-model")}, 404, "model-not-found"),
    ("model-not-ready", *POST_INF, {"json": influence(model_id="{building}")}, 409, "model-not-ready"),
    ("unknown-label-name", *POST_INF, {"json": influence(inputs=[{"text": "x", "label": "neutral"}])}, 422,
     "unknown-label"),
    ("unknown-label-index", *POST_INF, {"json": influence(inputs=[{"text": "x", "label": 2}])}, 422, "unknown-label"),
    ("label-negative-index", *POST_INF, {"json": influence(inputs=[{"text": "x", "label": -1}])}, 422,
     "invalid-request"),
    ("label-bool", *POST_INF, {"json": influence(inputs=[{"text": "x", "label": True}])}, 422, "invalid-request"),
    ("label-empty", *POST_INF, {"json": influence(inputs=[{"text": "x", "label": ""}])}, 422, "invalid-request"),
    # -- headers
    ("idempotency-key-too-long", *POST_INF, {"json": influence(), "headers": {"Idempotency-Key": "k" * 256}}, 422,
     "invalid-request"),
    ("idempotency-key-with-space", *POST_INF, {"json": influence(), "headers": {"Idempotency-Key": "a b"}}, 422,
     "invalid-request"),
    # -- model registration
    ("register-missing-train-data", "POST", "/v1/models", {"json": {"name": "m", "model_path": "models/tiny"}}, 422,
     "invalid-request"),
    ("register-empty-name", "POST", "/v1/models",
     {"json": {"name": "", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"}}}, 422,
     "invalid-request"),
    ("register-max-length-4", "POST", "/v1/models",
     {"json": {"name": "m", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"},
               "influence": {"max_length": 4}}}, 422, "invalid-request"),
    ("register-weight-decay-negative", "POST", "/v1/models",
     {"json": {"name": "m", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"},
               "influence": {"weight_decay": -1}}}, 422, "invalid-request"),
    ("register-params-empty-list", "POST", "/v1/models",
     {"json": {"name": "m", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"},
               "influence": {"params": []}}}, 422, "invalid-request"),
    ("register-format-unknown", "POST", "/v1/models",
     {"json": {"name": "m", "model_path": "models/tiny", "train_data": {"path": "train.jsonl", "format": "xls"}}},
     422, "invalid-request"),
    ("register-missing-path", "POST", "/v1/models",
     {"json": {"name": "m", "model_path": "models/none", "train_data": {"path": "train.jsonl"}}}, 422,
     "path-not-found"),
    # -- jobs: unknown ids, not finished, bad pages
    ("unknown-job", "GET", "/v1/jobs/no-such-job", {}, 404, "job-not-found"),
    ("unknown-job-results", "GET", "/v1/jobs/no-such-job/results", {}, 404, "job-not-found"),
    ("unknown-job-cancel", "POST", "/v1/jobs/no-such-job/cancel", {}, 404, "job-not-found"),
    ("unknown-model-get", "GET", "/v1/models/no-such-model", {}, 404, "model-not-found"),
    ("results-not-finished", "GET", "/v1/jobs/{queued}/results", {}, 409, "job-not-finished"),
    ("cancel-finished", "POST", "/v1/jobs/{done}/cancel", {}, 409, "job-not-cancellable"),
    ("results-limit-zero", "GET", "/v1/jobs/{done}/results?limit=0", {}, 422, "invalid-request"),
    ("results-limit-text", "GET", "/v1/jobs/{done}/results?limit=ten", {}, 422, "invalid-request"),
    ("results-offset-negative", "GET", "/v1/jobs/{done}/results?offset=-1", {}, 422, "invalid-request"),
    ("jobs-status-unknown", "GET", "/v1/jobs?status=done", {}, 422, "invalid-request"),
    ("models-limit-huge", "GET", "/v1/models?limit=100000", {}, 422, "invalid-request"),
    # -- routes and methods
    ("unknown-route", "GET", "/v2/influence", {}, 404, "not-found"),
    ("wrong-method", "PUT", "/v1/influence", {"json": influence()}, 405, "method-not-allowed"),
]


def test_the_matrix_is_wide() -> None:
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)
    assert len({case[5] for case in CASES}) >= 12  # distinct problem types exercised


def _fill(value, ids: dict):
    """Replace {ready}, {building}, {queued}, {done} placeholders with the fixture's ids."""
    if isinstance(value, str):
        for name, real in ids.items():
            value = value.replace("{" + name + "}", real)
        return value
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status", "slug"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_stable_problem(world, name, method, path, kwargs, status, slug) -> None:
    client, ids = world
    response = client.request(method, _fill(path, ids), **_fill(kwargs, ids))
    assert response.status_code == status, response.text[:500]
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + slug, body
    assert body["status"] == status
    assert body["title"] and body["detail"]
    # Never a stack trace or an echo of a large input.
    assert "Traceback" not in response.text and len(response.content) < 20_000


def test_nothing_was_queued_by_the_bad_requests(world, redis_client: redis.Redis) -> None:
    client, ids = world
    for name, method, path, kwargs, status, slug in CASES:
        client.request(method, _fill(path, ids), **_fill(kwargs, ids))
    # Only the fixture's two builds and two jobs exist: no refused request left a record or a message.
    assert len(client.get("/v1/jobs", params={"limit": 1000}).json()["items"]) == 4
    assert redis_client.llen("accel") == 0


def test_the_openapi_document_describes_the_problems(world) -> None:
    """Every operation but /healthz documents problem+json for 4XX and 503; FastAPI's own
    validation-error schema is gone (this API never answers it)."""
    client, _ = world
    document = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert document["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for status, response in responses.items():
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (method, path, status)
            if path != "/healthz":
                assert {"4XX", "503"} <= set(responses), (method, path)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/v1/models", "GET, POST"),
    ("PATCH", "/v1/models/some-id", "GET, DELETE"),
    ("DELETE", "/v1/jobs", "GET"),
    ("GET", "/v1/influence", "POST"),
    ("POST", "/healthz", "GET"),
])
def test_405_names_every_method_of_the_path(world, method: str, path: str, allow: str) -> None:
    """RFC 9110: Allow lists all the resource's methods, not those of the first route that matched."""
    client, _ = world
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.json()["type"] == PROBLEM + "method-not-allowed"
    assert response.headers["allow"] == allow


def test_blank_query_values_mean_the_defaults_as_documented(world) -> None:
    client, ids = world
    assert client.get("/v1/jobs?status=&limit=").status_code == 200
    assert client.get(f"/v1/jobs/{ids['done']}/results?offset=&limit=").json()["total"] == 1
    schema = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["parameters"]
    assert all({"type": "string", "maxLength": 0} in p["schema"]["anyOf"] for p in schema)
