"""API keys with roles and ownership: admins run the service, client keys see only their own jobs.

Every route is in ROUTES with what an admin key and a client key get from it, so a new route
cannot slip in without a decision; another client's job is a 404 (its id does not leak).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from records.api_keys import bare_key_name, parse_api_keys
from records.heartbeat import beat
from records.jobs import JobStore
from records.models import ModelStore
from records.settings import settings_from
from service.app import create_app
from test_hardening_security import every_route

PROBLEM = "https://fastif.dev/problems/"
SECRETS = {"ops": "ops-secret-7f3a", "alice": "alice-secret-91c2", "bob": "bob-secret-44d0"}
BARE = "bare-legacy-key-5e61"
KEYS = [f"ops:{SECRETS['ops']}:admin", f"alice:{SECRETS['alice']}:client", f"bob:{SECRETS['bob']}:client", BARE]
ADMIN, ALICE, BOB, LEGACY = ({"X-API-Key": s} for s in (SECRETS["ops"], SECRETS["alice"], SECRETS["bob"], BARE))
PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/ui", "/ui/"}
LABELS = ["negative", "positive"]


def problem_slug(response) -> str:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return response.json()["type"].removeprefix(PROBLEM)


@pytest.fixture
def service(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    app = create_app(settings_from(redis_url=redis_url, data_root=tmp_path, api_keys=KEYS))
    beat(redis_client, "w", {})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


MODEL_BODY = {"name": "tiny", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"}}


def ready_model(client: TestClient, redis_client: redis.Redis) -> str:
    response = client.post("/v1/models", json=MODEL_BODY, headers=ADMIN)
    assert response.status_code == 202, response.text
    ModelStore(redis_client).set_ready(response.json()["id"], "fp-roles", 10, LABELS)
    return response.json()["id"]


def influence(model_id: str, text: str = "a fine film") -> dict:
    return {"model_id": model_id, "inputs": [{"text": text}]}


def submit(client: TestClient, headers: dict, path: str, body: dict, **extra) -> dict:
    response = client.post(path, json=body, headers={**headers, **extra})
    assert response.status_code == 202, response.text
    return response.json()




@pytest.fixture
def world(service: TestClient, redis_client: redis.Redis) -> dict:
    """A ready model; alice's finished influence job and graph job; bob's queued job; an admin job."""
    model_id = ready_model(service, redis_client)
    jobs = JobStore(redis_client)
    alice = submit(service, ALICE, "/v1/influence", influence(model_id))
    alice_graph = submit(service, ALICE, "/v1/graph", {"model_id": model_id, "inputs": [{"text": "a"}, {"text": "b"}]})
    bob = submit(service, BOB, "/v1/influence", influence(model_id, "bob's text"))
    admin = submit(service, ADMIN, "/v1/influence", influence(model_id, "the admin's text"))
    assert jobs.start_delivery(alice["id"]) == 1
    assert jobs.succeed(alice["id"], [{"input_index": 0, "helpful": [{"text": "training text"}]}])
    return {"model": model_id, "alice": alice["id"], "alice_graph": alice_graph["id"], "bob": bob["id"],
            "admin": admin["id"]}


# (method, path, admin status, client status, body or None). `{mine}` is one of alice's own jobs,
# `{theirs}` one of bob's: alice (a client) gets 404 for it; `{model}` the ready model.
ROUTES = [
    ("GET", "/v1/models", 200, 200, None),
    ("POST", "/v1/models", 202, 403, MODEL_BODY),
    ("GET", "/v1/models/{model}", 200, 200, None),
    ("DELETE", "/v1/models/{model}", 204, 403, None),
    ("POST", "/v1/models/{model}/quality", 422, 422, {}),  # past the role check, to the body's own errors
    ("POST", "/v1/influence", 202, 202, "influence"),
    ("POST", "/v1/explain", 202, 202, "influence"),
    ("POST", "/v1/self-influence", 202, 202, {"model_id": "{model}", "sample": 4}),
    ("POST", "/v1/graph", 202, 202, {"model_id": "{model}", "inputs": [{"text": "a"}, {"text": "b"}]}),
    ("POST", "/v1/correct", 422, 422, {}),
    ("GET", "/v1/jobs", 200, 200, None),
    ("GET", "/v1/jobs/{theirs}", 200, 404, None),
    ("GET", "/v1/jobs/{theirs}/results", 409, 404, None),
    ("GET", "/v1/jobs/{theirs}/results.jsonl", 409, 404, None),
    ("POST", "/v1/jobs/{theirs}/cancel", 200, 404, None),
    ("GET", "/v1/jobs/{theirs}/graph.png", 404, 404, None),
    ("GET", "/v1/jobs/{theirs}/graph.svg", 404, 404, None),
    ("GET", "/v1/jobs/{theirs}/correction.png", 404, 404, None),
    ("GET", "/metrics", 200, 403, None),
]


def fill(template: str, world: dict) -> str:
    return template.replace("{model}", world["model"]).replace("{theirs}", world["bob"])


def test_every_route_has_a_role_decision(service: TestClient) -> None:
    routes = {(path, method) for path, method in every_route(service.app) if path not in PUBLIC}
    decided = {(re.sub(r"\{(model|theirs)\}", lambda m: "{model_id}" if m[1] == "model" else "{job_id}", path), method)
               for method, path, *_ in ROUTES}
    assert routes == decided


@pytest.mark.parametrize("method,path,admin_status,client_status,body", ROUTES,
                         ids=[f"{m} {p}" for m, p, *_ in ROUTES])
def test_what_each_role_may_do(service: TestClient, world: dict, method: str, path: str, admin_status: int,
                               client_status: int, body) -> None:
    url = fill(path, world)
    payload = influence(world["model"]) if body == "influence" else json.loads(fill(json.dumps(body), world)) \
        if body is not None else None
    # The client first: a client's refusal must change nothing the admin then sees.
    as_client = service.request(method, url, headers=ALICE, json=payload)
    assert as_client.status_code == client_status, as_client.text
    if client_status == 403:
        assert problem_slug(as_client) == "forbidden"
        assert "alice" in as_client.json()["detail"] and SECRETS["alice"] not in as_client.text
    if client_status == 404 and "{theirs}" in path:
        assert problem_slug(as_client) == "job-not-found"  # the same answer as for an id that never existed
        assert service.request(method, url.replace(world["bob"], "0" * 32), headers=ALICE,
                               json=payload).json()["type"] == as_client.json()["type"]
    as_admin = service.request(method, url, headers=ADMIN, json=payload)
    assert as_admin.status_code == admin_status, as_admin.text


def test_a_client_lists_reads_and_cancels_only_its_own_jobs(service: TestClient, world: dict) -> None:
    listed = {name: {job["id"] for job in service.get("/v1/jobs", headers=headers).json()["items"]}
              for name, headers in (("alice", ALICE), ("bob", BOB), ("admin", ADMIN))}
    assert listed["alice"] == {world["alice"], world["alice_graph"]}
    assert listed["bob"] == {world["bob"]}
    assert {world["alice"], world["alice_graph"], world["bob"], world["admin"]} <= listed["admin"]
    assert {job["id"] for job in service.get("/v1/jobs?status=succeeded", headers=ALICE).json()["items"]} == \
        {world["alice"]}
    # Alice reads her results; bob cannot, nor cancel her queued graph job.
    mine = service.get(f"/v1/jobs/{world['alice']}/results", headers=ALICE)
    assert mine.status_code == 200 and mine.json()["items"][0]["helpful"][0]["text"] == "training text"
    assert service.get(f"/v1/jobs/{world['alice']}/results", headers=BOB).status_code == 404
    assert service.post(f"/v1/jobs/{world['alice_graph']}/cancel", headers=BOB).status_code == 404
    assert service.get(f"/v1/jobs/{world['alice_graph']}", headers=ALICE).json()["status"] == "queued"
    cancelled = service.post(f"/v1/jobs/{world['alice_graph']}/cancel", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_the_owner_is_recorded_by_name_and_no_secret_is_stored(service: TestClient, world: dict,
                                                               redis_client: redis.Redis) -> None:
    assert service.get(f"/v1/jobs/{world['alice']}", headers=ALICE).json()["owner"] == "alice"
    assert service.get(f"/v1/jobs/{world['bob']}", headers=ADMIN).json()["owner"] == "bob"
    assert redis_client.hget(f"fastif:job:{world['admin']}", "owner") in ("ops", b"ops")
    stored = []
    for key in redis_client.scan_iter("*"):
        kind = redis_client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "hash":
            stored.append(json.dumps({str(k): str(v) for k, v in redis_client.hgetall(key).items()}))
        elif kind == "string":
            stored.append(str(redis_client.get(key)))
        elif kind == "list":
            stored.append(str(redis_client.lrange(key, 0, -1)))
        stored.append(str(key))
    everything = "\n".join(stored)
    assert "alice" in everything
    for secret in (*SECRETS.values(), BARE):
        assert secret not in everything


def test_a_bare_key_is_an_admin_named_after_its_digest(service: TestClient, world: dict) -> None:
    registered = service.post("/v1/models", json=MODEL_BODY, headers=LEGACY)
    assert registered.status_code == 202
    job = submit(service, LEGACY, "/v1/influence", influence(world["model"]))
    assert job["owner"] == bare_key_name(BARE) == "key-" + __import__("hashlib").sha256(BARE.encode()).hexdigest()[:8]
    seen = {j["id"] for j in service.get("/v1/jobs", headers=LEGACY).json()["items"]}
    assert {world["alice"], world["bob"], job["id"]} <= seen
    assert service.get(f"/v1/jobs/{world['bob']}", headers=LEGACY).status_code == 200


def test_an_idempotency_key_is_each_callers_own(service: TestClient, world: dict) -> None:
    body = influence(world["model"], "same body, same key")
    alice = submit(service, ALICE, "/v1/influence", body, **{"Idempotency-Key": "retry-1"})
    bob = submit(service, BOB, "/v1/influence", body, **{"Idempotency-Key": "retry-1"})
    assert alice["id"] != bob["id"] and (alice["owner"], bob["owner"]) == ("alice", "bob")
    assert submit(service, ALICE, "/v1/influence", body, **{"Idempotency-Key": "retry-1"})["id"] == alice["id"]
    assert submit(service, BOB, "/v1/influence", body, **{"Idempotency-Key": "retry-1"})["id"] == bob["id"]


def test_metrics_count_requests_per_key_name(service: TestClient, world: dict) -> None:
    before = service.get("/metrics", headers=ADMIN).text
    for _ in range(3):
        assert service.get("/v1/models", headers=BOB).status_code == 200
    service.get("/v1/models", headers={"X-API-Key": "wrong"})
    text = service.get("/metrics", headers=ADMIN).text

    def count(body: str, name: str) -> float:
        found = re.search(rf'^fastif_http_requests_by_key_total{{key="{name}"}} (\S+)$', body, re.M)
        return float(found[1]) if found else 0.0

    assert count(text, "bob") - count(before, "bob") == 3
    assert count(text, "ops") - count(before, "ops") == 1  # the scrape before
    for secret in (*SECRETS.values(), BARE):
        assert secret not in text


def test_a_client_key_cannot_save_a_corrected_model(service: TestClient, world: dict) -> None:
    body = {"model_id": world["model"], "anchors": [{"text": "bad", "label": "negative"}],
            "evaluation": {"examples": [{"text": "bad", "label": "negative"}]}, "save_as": "fixed"}
    refused = service.post("/v1/correct", json=body, headers=ALICE)
    assert refused.status_code == 403 and problem_slug(refused) == "forbidden"
    assert service.get("/v1/jobs", headers=ALICE).json()["items"].__len__() == 2  # nothing was queued
    assert service.post("/v1/correct", json=body, headers=ADMIN).status_code == 202
    assert service.post("/v1/correct", json={**body, "save_as": None}, headers=ALICE).status_code == 202


def test_the_ui_page_loads_for_either_role(service: TestClient) -> None:
    """The page itself is public; what it lists and reads follows the pasted key's role (above)."""
    assert service.get("/ui").status_code == 200


@pytest.mark.parametrize("entries,message", [
    (["svc:SECRET1"], "entry 1 is neither a bare key nor name:key:role"),
    (["ok:SECRET1:admin", "x:SECRET2:z:w"], "entry 2 is neither"),
    (["svc:SECRET1:root"], "role 'root' is not admin or client"),
    (["bad name:SECRET1:client"], "the name must be"),
    (["svc::client"], "entry 1 (svc) has an empty key"),
    (["svc:SECRET1:client", "svc:SECRET2:admin"], "names a key twice: ['svc']"),
    (["a:SECRET1:client", "b:SECRET1:admin"], "the same key twice"),
])
def test_malformed_key_entries_stop_the_service_with_a_clear_error(entries: list[str], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_api_keys(entries)
    assert message in str(refused.value)
    with pytest.raises(ValueError) as in_settings:
        settings_from(api_keys=entries)
    assert message in str(in_settings.value)
    for shown in (str(refused.value), str(in_settings.value)):  # the secrets never appear in the message
        assert "SECRET" not in shown


def test_entries_parse_into_names_and_roles() -> None:
    keys = parse_api_keys(["ops:s1:admin", "app:s2:client", "bare"])
    assert [(k.name, k.secret, k.role) for k in keys] == [("ops", "s1", "admin"), ("app", "s2", "client"),
                                                          (bare_key_name("bare"), "bare", "admin")]
    assert "s1" not in repr(keys)
    assert settings_from(api_keys="ops:s1:admin, app:s2:client").credentials == keys[:2]
