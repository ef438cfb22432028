"""Security: API keys on every route, paths inside the data root, JSON-only Celery, safetensors
only, no remote code, and the size limits. (A pickle message sent to a real worker is in
test_hardening_faults.py, which has the live worker.)"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient

from records.celery_app import make_celery
from records.heartbeat import beat
from records.models import ModelStore
from records.settings import settings_from
from service.app import create_app
from tiny import make_tiny_bert

PROBLEM = "https://fastif.dev/problems/"
KEY = "the-right-key-0123456789"
REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ["api_schemas", "records", "service", "workers", "fastif", "fastif_cli", "bench"]

# Routes anyone may call: liveness and readiness (they reveal nothing but "up").
HEALTH = {"/healthz", "/readyz"}
# Static pages that hold no data (the API's own description and pages that call the API with
# the user's key). They are public by design; the test proves they read nothing from Redis.
STATIC_PUBLIC = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/ui", "/ui/"}


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, (response.request.method, response.request.url, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + slug
    return body


def every_route(app) -> list[tuple[str, str]]:
    """(path template, method) of every HTTP route, included routers flattened."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI with lazily included routers
    except ImportError:  # older FastAPI: app.routes is already flat
        contexts = list(app.routes)
    else:
        contexts = list(iter_route_contexts(app.routes))
    found = []
    for route in contexts:
        path = getattr(route, "path", None)
        assert path, f"a route without a path: {route!r}"
        methods = getattr(route, "methods", None) or {"GET"}  # a mount: try GET below it
        found += [(path, method) for method in sorted(methods) if method != "HEAD"]
    return found


def concrete(path: str) -> str:
    """A template with made-up ids: /v1/jobs/{job_id} -> /v1/jobs/some-id."""
    return re.sub(r"\{[^}]+\}", "some-id", path)


@pytest.fixture
def keyed(redis_client: redis.Redis, redis_url: str, tmp_path: Path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    app = create_app(settings_from(redis_url=redis_url, data_root=tmp_path, api_keys=[KEY, "second-key"]))
    beat(redis_client, "w", {})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


# -- API keys ---------------------------------------------------------------------------------

def test_route_enumeration_sees_every_documented_operation(keyed: TestClient) -> None:
    """The walk over app.routes must not miss included routers (or a new route could slip by)."""
    routes = set(every_route(keyed.app))
    documented = {(path, method.upper()) for path, ops in keyed.app.openapi()["paths"].items() for method in ops}
    assert documented <= routes, documented - routes
    assert len(routes) >= 14


BAD_KEYS = [
    ("missing", {}),
    ("wrong", {"X-API-Key": "wrong"}),
    ("empty", {"X-API-Key": ""}),
    ("prefix-of-the-key", {"X-API-Key": KEY[:-1]}),
    ("key-plus-suffix", {"X-API-Key": KEY + "x"}),
    ("other-case", {"X-API-Key": KEY.upper()}),
    ("two-keys-joined", {"X-API-Key": f"{KEY},second-key"}),
    ("as-bearer-token", {"Authorization": f"Bearer {KEY}"}),
    ("in-another-header", {"X-Api-Token": KEY}),
]


def test_every_route_but_health_refuses_a_missing_or_wrong_key(keyed: TestClient) -> None:
    checked = []
    for path, method in every_route(keyed.app):
        if path in HEALTH or path in STATIC_PUBLIC:
            continue
        url = concrete(path)
        for name, headers in BAD_KEYS:
            response = keyed.request(method, url, headers=headers, json={} if method in ("POST", "PUT", "PATCH") else None)
            body = assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("ApiKey")
            assert KEY not in json.dumps(body)
        # In the query string the key is not a credential either.
        assert_problem(keyed.request(method, url + f"?api_key={KEY}&X-API-Key={KEY}",
                                     json={} if method == "POST" else None), 401, "unauthorized")
        # The right key gets past auth (to whatever the route answers to a made-up id or an empty body).
        passed = keyed.request(method, url, headers={"X-API-Key": KEY}, json={} if method == "POST" else None)
        assert passed.status_code != 401, (method, url)
        checked.append((method, path))
    assert len(checked) >= 12, checked


def test_health_and_static_routes_are_public_and_read_no_data(keyed: TestClient, tmp_path: Path) -> None:
    public = [(p, m) for p, m in every_route(keyed.app) if p in HEALTH or p in STATIC_PUBLIC]
    assert {p for p, _ in public} >= HEALTH
    # The same pages from an app whose Redis does not exist: identical, so they read no state.
    dead = create_app(settings_from(redis_url="redis://127.0.0.1:1/0", data_root=tmp_path, api_keys=[KEY]))
    with TestClient(dead, raise_server_exceptions=False) as offline:
        for path, method in public:
            if path == "/readyz":
                assert keyed.get(path).status_code == 200  # needs no key
                assert_problem(offline.get(path), 503, "redis-unavailable")
                continue
            live, cut_off = keyed.request(method, path, follow_redirects=False), offline.request(
                method, path, follow_redirects=False)
            assert live.status_code < 400 and live.status_code == cut_off.status_code, path
            assert live.content == cut_off.content, path


# -- paths ------------------------------------------------------------------------------------
# test_service_api.py refuses 17 traversal attempts in both path fields; these are more.

@pytest.fixture
def rooted(redis_client: redis.Redis, redis_url: str, tmp_path: Path):
    root = tmp_path / "root"
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (root / "link_out").symlink_to(outside)
    (root / "chain_a").symlink_to(root / "link_out")  # a link to a link that points out
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    (root / "models" / "inside_link").symlink_to(root / "models" / "tiny")  # stays inside: allowed
    app = create_app(settings_from(redis_url=redis_url, data_root=root))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, root, outside


def more_traversals(root: Path, outside: Path) -> list[tuple[str, str]]:
    out, missing = "path-outside-data-root", "path-not-found"
    return [
        ("chain_a/model", out),
        ("loop_a", out),
        (str(root / "link_out" / "model"), out),  # absolute, through the root, then out
        (str(outside / "model"), out),
        (str(root) + "/../outside/model", out),
        ("//etc/passwd", out),
        ("models/tiny/" + "../" * 40 + "etc/passwd", out),
        ("models/./../../outside", out),
        ("%252e%252e%252fetc", missing),  # double URL-encoding: a literal name
        ("\u2025/etc/passwd", missing),  # TWO DOT LEADER
        ("\uff0e\uff0e/etc/passwd", missing),  # fullwidth dots
        ("file:///etc/passwd", missing),
        ("\\\\server\\share\\model", missing),
        ("..\u0000/etc", out),
    ]


def test_more_path_traversals_are_refused(rooted) -> None:
    client, root, outside = rooted
    attempts = more_traversals(root, outside)
    assert len(attempts) >= 10
    for path, slug in attempts:
        for field in ("model_path", "train_data"):
            body = {"name": "t", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"}}
            if field == "model_path":
                body["model_path"] = path
            else:
                body["train_data"]["path"] = path
            problem = assert_problem(client.post("/v1/models", json=body), 422, slug)
            echoed = json.dumps(problem).replace(json.dumps(path)[1:-1], "")  # the client's own input aside
            assert str(root) not in echoed and str(outside) not in echoed and "outside/model" not in echoed
    assert client.get("/v1/models").json()["items"] == []
    # A link that stays inside the root is fine, and is stored resolved.
    accepted = client.post("/v1/models", json={"name": "t", "model_path": "models/inside_link",
                                               "train_data": {"path": "train.jsonl"}})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["request"]["model_path"] == "models/tiny"


def test_the_worker_resolves_paths_again_and_refuses_an_escape(tmp_path: Path) -> None:
    """A path that was inside at registration but is swapped for a link out later, or a record
    edited in Redis, is refused where the worker opens it."""
    from workers.registry import _resolve

    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    settings = settings_from(data_root=root)
    (root / "models" / "m").mkdir()
    assert _resolve(settings, "models/m") == (root / "models" / "m").resolve()
    (root / "models" / "m").rmdir()
    (root / "models" / "m").symlink_to(outside)  # swapped after registration
    for relative in ("models/m", "../outside", str(outside), "models/../../outside"):
        with pytest.raises(ValueError, match="outside the data root"):
            _resolve(settings, relative)


# -- Celery: JSON only ------------------------------------------------------------------------

def test_celery_accepts_json_only() -> None:
    for app in (make_celery(settings_from(redis_url="redis://127.0.0.1:1/0")),):
        conf = app.conf
        assert conf.task_serializer == "json"
        assert conf.result_serializer == "json"
        assert list(conf.accept_content) == ["json"]
        assert conf.result_accept_content in (None, ["json"])  # None: falls back to accept_content
        assert conf.event_serializer == "json"
    from workers.celery_app import celery_app  # the workers' own app

    assert list(celery_app.conf.accept_content) == ["json"]
    assert celery_app.conf.task_serializer == "json"
    assert celery_app.conf.result_accept_content in (None, ["json"])


# -- weights and remote code ------------------------------------------------------------------

class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_model_with_only_pytorch_model_bin_is_refused(tmp_path: Path) -> None:
    from fastif import ModelLoadError, load_classifier

    folder = make_tiny_bert(tmp_path / "model")
    weights = next(folder.glob("*.safetensors"))
    weights.unlink()
    marker = tmp_path / "pickle-was-loaded"
    # A .bin is a pickle: this one would create the marker file if anything unpickled it.
    torch.save({"trap": _Trap(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_classifier(folder, device="cpu")
    assert not marker.exists()


def test_safetensors_are_used_even_when_a_bin_lies_beside_them(tmp_path: Path) -> None:
    from fastif import load_classifier

    folder = make_tiny_bert(tmp_path / "model")
    marker = tmp_path / "pickle-was-loaded"
    torch.save({"trap": _Trap(marker)}, folder / "pytorch_model.bin")
    classifier = load_classifier(folder, device="cpu")
    assert classifier.labels == ["negative", "positive"]
    assert not marker.exists()


def test_auto_map_code_in_a_model_folder_is_never_run(tmp_path: Path) -> None:
    from fastif import ModelLoadError, load_classifier

    folder = make_tiny_bert(tmp_path / "model")
    marker = tmp_path / "remote-code-ran"
    trap = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    for name in ("evil_config.py", "evil_model.py", "evil_tokenizer.py"):
        (folder / name).write_text(trap + "from transformers import *\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig",
                          "AutoModelForSequenceClassification": "evil_model.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    try:
        classifier = load_classifier(folder, device="cpu")
    except ModelLoadError as err:  # refusing is fine too, with a clear error
        assert str(folder) in str(err)
    else:
        assert type(classifier.model).__name__ == "BertForSequenceClassification"
    assert not marker.exists()


def _code_files() -> list[Path]:
    files = []
    for folder in CODE_DIRS:
        files += [p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]
    return files


DANGEROUS = [
    (re.compile(r"trust_remote_code\s*=\s*(?!False\b)"), "trust_remote_code must be literally False"),
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b", re.M), "no pickle"),
    (re.compile(r"\bpickle\.loads?\("), "no pickle"),
    (re.compile(r"\btorch\.load\("), "torch.load unpickles"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy pickles"),
    (re.compile(r"use_safetensors\s*=\s*False"), "weights from safetensors only"),
    (re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"), "yaml.safe_load only"),
    (re.compile(r"(task_serializer|result_serializer|accept_content)\s*=\s*[\[\"']*(pickle|yaml|msgpack)"),
     "JSON only on Celery"),
]


def test_no_remote_code_and_no_pickle_anywhere_in_the_code() -> None:
    files = _code_files()
    assert len(files) > 30
    offences = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern, why in DANGEROUS:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offences.append(f"{path.relative_to(REPO)}:{line}: {match.group(0).strip()!r} ({why})")
    assert not offences, "\n".join(offences)
    # And every from_pretrained of the engine says trust_remote_code=False out loud.
    modeling = (REPO / "fastif" / "modeling.py").read_text()
    assert modeling.count("from_pretrained(") == modeling.count("trust_remote_code=False")


# -- limits -----------------------------------------------------------------------------------

def _post_routes(app) -> list[str]:
    return sorted({path for path, method in every_route(app) if method == "POST"})


def test_the_body_limit_holds_on_every_post_route(redis_client, redis_url: str, tmp_path: Path) -> None:
    app = create_app(settings_from(redis_url=redis_url, data_root=tmp_path, max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as client:
        routes = _post_routes(app)
        assert "/v1/influence" in routes and "/v1/models" in routes
        big = json.dumps({"model_id": "m", "inputs": [{"text": "x" * 5000}]})
        for path in routes:
            url = concrete(path)
            assert_problem(client.post(url, content=big, headers={"content-type": "application/json"}), 413,
                           "body-too-large")

            def chunks():  # no Content-Length: the limit counts the bytes as they come
                for _ in range(10):
                    yield b" " * 1000

            if "requestBody" not in app.openapi()["paths"].get(path, {}).get("post", {}):
                continue  # a route that never reads a body never holds one in memory either
            assert_problem(client.post(url, content=chunks(), headers={"content-type": "application/json"}), 413,
                           "body-too-large")
        # Just under the limit is not refused for its size.
        small = json.dumps({"model_id": "m", "inputs": [{"text": "x" * 3000}]})
        assert client.post("/v1/influence", content=small, headers={"content-type": "application/json"}).status_code == 404


def test_inputs_and_text_limits_hold_at_the_edges(redis_client, redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "train.jsonl").write_text("{}\n")
    app = create_app(settings_from(redis_url=redis_url, data_root=tmp_path, max_inputs=5, max_text_chars=50,
                                   max_queued_jobs=100))
    with TestClient(app, raise_server_exceptions=False) as client:
        model = client.post("/v1/models", json={"name": "t", "model_path": "models/tiny",
                                                "train_data": {"path": "train.jsonl"}}).json()
        ModelStore(redis_client).set_ready(model["id"], "fp", 3, ["negative", "positive"])

        def post(inputs):
            return client.post("/v1/influence", json={"model_id": model["id"], "inputs": inputs})

        assert post([{"text": "x"}] * 5).status_code == 202
        assert_problem(post([{"text": "x"}] * 6), 413, "too-many-inputs")
        assert_problem(post([{"text": "x"}] * 10_000), 413, "too-many-inputs")
        assert post([{"text": "x" * 50, "text_pair": "y" * 50}]).status_code == 202
        assert_problem(post([{"text": "x" * 51}]), 413, "text-too-long")
        assert_problem(post([{"text": "x", "text_pair": "y" * 51}]), 413, "text-too-long")
        # Characters, not bytes: 50 four-byte characters are within the limit.
        assert post([{"text": "\U0001F600" * 50}]).status_code == 202
        assert_problem(post([{"text": "x"}, {"text": "x" * 51}]), 413, "text-too-long")


def test_settings_limits_come_from_the_environment(monkeypatch) -> None:
    from records.settings import Settings

    for name, value in {"FASTIF_MAX_INPUTS": "7", "FASTIF_MAX_TEXT_CHARS": "99", "FASTIF_MAX_BODY_BYTES": "1234",
                        "FASTIF_MAX_DELIVERIES": "2"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.max_inputs, settings.max_text_chars, settings.max_body_bytes, settings.max_deliveries) == (
        7, 99, 1234, 2)
    monkeypatch.setenv("FASTIF_MAX_INPUTS", "0")
    with pytest.raises(ValueError):
        Settings()
    assert os.environ["FASTIF_MAX_INPUTS"] == "0"
