"""Schemathesis against the app's own OpenAPI document: no 5xx, no response that breaks the spec.

Runs in-process over ASGI against a real Redis DB (the session's test DB), with API keys
configured, so the auth checks of Schemathesis (a missing or made-up key must be refused)
run too. Every operation gets positive (schema-valid) and negative (schema-violating)
cases; half of the positive cases are pointed at a real, ready model and at real jobs so
that the checks behind validation (labels, limits, idempotency, pages) are reached as
well. At least MIN_CASES cases run in all; the number is asserted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from conftest import _FLUSH_KEEP_LOCK, LOCK_KEY, LOCK_TTL_S
from records.heartbeat import beat
from records.jobs import JobStore
from records.models import ModelStore
from records.settings import settings_from
from service.app import create_app

pytestmark = pytest.mark.slow

API_KEY = "schemathesis-key"
MIN_CASES = 1000
# Cases per operation and generation mode: about 1,300 in all for 18 operations.
EXAMPLES = int(os.environ.get("FASTIF_SCHEMATHESIS_EXAMPLES", "40"))

CONFIG = schemathesis.Config.from_dict({
    # Unknown query parameters are ignored, as by most HTTP APIs (cache busters, tracing);
    # only bodies are strict (extra fields are a 422). So extra query parameters are not
    # "schema-violating" for this API.
    "generation": {"allow-extra-parameters": False},
    "checks": {
        # Schema-valid bodies may still be refused for reasons the schema cannot carry:
        # 413 (FASTIF_MAX_INPUTS / MAX_TEXT_CHARS are deployment settings) and 422 (paths
        # must exist in the data root, labels must be the model's, an Idempotency-Key is
        # bound to its first body). Both are documented problems; 5xx never is.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "413", "422",
                                                           "429"]},
    },
})


def flush_keeping_claim(client: redis.Redis) -> None:
    """Empty the session's test DB but keep its claim (a bare FLUSHDB would free the DB for
    another test session, whose workers would then consume our messages)."""
    token = client.get(LOCK_KEY) or "held"
    client.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, token, LOCK_TTL_S)


@pytest.fixture(scope="module")
def world(redis_url: str, tmp_path_factory) -> dict:
    """An app with keys over the test DB, a ready model, jobs in every state, a live heartbeat."""
    root: Path = tmp_path_factory.mktemp("st-data")
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "models" / "tiny" / "config.json").write_text("{}")
    (root / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    flush_keeping_claim(client)
    beat(client, "schemathesis-worker", {"queues": "cpu,accel"}, ttl_s=3600)
    app = create_app(settings_from(redis_url=redis_url, data_root=root, api_keys=[API_KEY],
                                   max_queued_jobs=10**9, max_inputs=8, max_text_chars=200))
    with TestClient(app) as http:
        response = http.post("/v1/models", headers={"X-API-Key": API_KEY},
                             json={"name": "st", "model_path": "models/tiny", "train_data": {"path": "train.jsonl"}})
        assert response.status_code == 202, response.text
    model_id = response.json()["id"]
    ModelStore(client).set_ready(model_id, "fp-schemathesis", 1, ["negative", "positive"])
    jobs = JobStore(client)
    done = jobs.create("influence", model_id, {"n": 2})
    jobs.start_delivery(done.id)
    jobs.succeed(done.id, [{"input_index": 0}, {"input_index": 1}])
    failed = jobs.create("influence", model_id, {"n": 1})
    jobs.fail(failed.id, "lissa-diverged", "raise scale")
    running = jobs.create("influence", model_id, {"n": 3})
    jobs.start_delivery(running.id)
    queued = jobs.create("influence", model_id, {"n": 4})
    yield {"app": app, "model_id": model_id, "job_ids": [done.id, failed.id, running.id, queued.id]}
    flush_keeping_claim(client)
    client.close()


def _with_key(case):
    """The configured key where the case sends one (a negative case may leave it out on purpose)."""
    if case.headers and "X-API-Key" in case.headers:
        case.headers["X-API-Key"] = API_KEY
    return case


def _aim_at_real_ids(case, world: dict, use_real: bool, pick: int):
    """Point a positive case at the real model and jobs (never DELETE the model itself)."""
    if not use_real:
        return case
    params = case.path_parameters or {}
    if "job_id" in params:
        params["job_id"] = world["job_ids"][pick % len(world["job_ids"])]
    if "model_id" in params and case.method.upper() == "GET":
        params["model_id"] = world["model_id"]
    if isinstance(case.body, dict) and "model_id" in case.body:
        case.body["model_id"] = world["model_id"]
    return case


def test_schemathesis_finds_no_server_error_and_no_spec_violation(world: dict) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", world["app"], config=CONFIG)
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    unbreakable: list[str] = []

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode).map(_with_key)
            if mode == GenerationMode.POSITIVE:
                strategy = st.tuples(strategy, st.booleans(), st.integers(0, 3)).map(
                    lambda args: _aim_at_real_ids(args[0], world, args[1], args[2]))

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                key = f"{operation.label} [{mode.value}]"
                counts[key] = counts.get(key, 0) + 1
                response = case.call_and_validate()
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Unsatisfiable:
                # No parameters and no body (GET /healthz): nothing a negative case could break.
                assert mode == GenerationMode.NEGATIVE and not operation.body and not any(
                    True for _ in operation.iter_parameters()), operation.label
                unbreakable.append(operation.label)
            except BaseException as err:  # collect every operation's failure, then report them all
                if isinstance(err, KeyboardInterrupt):
                    raise
                failures.append(f"{operation.label} [{mode.value}]: {err}")

    total = sum(counts.values())
    print(f"schemathesis: {total} cases over {len(operations)} operations (no negative cases for {unbreakable}); "
          f"statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n\n".join(failures)
    assert total >= MIN_CASES, counts
    assert not [s for s in statuses if s >= 500], statuses
