"""Dataset jobs at the API: the input file is read whole before anything is queued, and refused by file, line and field.

The workers' side (shards over real workers, redone shards, cancel) is in
tests/test_integration_dataset_jobs.py; here no worker runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from records.jobs import JobStore
from test_service_api import assert_problem, client, data_root, make_client, queued_messages, ready_model  # noqa: F401

ROWS = [{"text": "a fine film", "label": "positive"}, {"text": "dull"}, {"text": "so so", "label": 0}]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def nothing_queued(redis_client) -> bool:
    """No job but the model's build was recorded, and no task was sent to the job queue."""
    return redis_client.zcard("fastif:jobs") == 1 and not queued_messages(redis_client, "accel")


@pytest.mark.parametrize(("route", "kind", "extra"), [("/v1/influence", "influence", {"k": 5}),
                                                      ("/v1/explain", "explain", {}),
                                                      ("/v1/self-influence", "self_influence", {})])
def test_a_dataset_job_records_its_file_pinned_and_counted(client, redis_client, data_root, route, kind, extra):  # noqa: F811
    model = ready_model(client, redis_client)
    file = write_rows(data_root / "inputs.jsonl", ROWS)
    response = client.post(route, json={"model_id": model["id"], "inputs_from": {"path": "./inputs.jsonl"}, **extra})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["kind"], job["inputs_total"], job["progress"]["total"]) == (kind, 3, 3)
    stored = JobStore(redis_client).request(job["id"])["inputs_from"]
    assert stored["path"] == "inputs.jsonl"
    assert stored["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert [m["headers"]["task"] for m in queued_messages(redis_client, "accel")] == [f"fastif.{kind}"]
    # A dataset job's results are readable from the start: none yet.
    page = client.get(f"/v1/jobs/{job['id']}/results").json()
    assert (page["total"], page["items"]) == (0, [])
    assert client.get(f"/v1/jobs/{job['id']}/results.jsonl").text == ""


def test_a_pinned_sha256_must_match_the_file(client, redis_client, data_root):  # noqa: F811
    model = ready_model(client, redis_client)
    write_rows(data_root / "inputs.jsonl", ROWS)
    body = {"model_id": model["id"], "inputs_from": {"path": "inputs.jsonl", "sha256": "0" * 64}}
    problem = assert_problem(client.post("/v1/influence", json=body), 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["body", "inputs_from", "sha256"]
    assert nothing_queued(redis_client)


BAD_FILES = {
    # name: (file rows or None for no file, path given, request fields, status, slug, what the detail names)
    "missing": (None, "nope.jsonl", {}, 422, "path-not-found", ["nope.jsonl"]),
    "outside": (None, "../outside.jsonl", {}, 422, "path-outside-data-root", ["../outside.jsonl"]),
    "no-text-field": ([ROWS[0], ROWS[1], {"sentence": "x"}], "in.jsonl", {}, 422, "invalid-data-file",
                      ["in.jsonl, line 3", "'text'"]),
    "named-field-absent": (ROWS, "in.jsonl", {"text_field": "sentence"}, 422, "invalid-data-file",
                           ["in.jsonl, line 1", "'sentence'"]),
    "not-json": ([ROWS[0], "{oops"], "in.jsonl", {}, 422, "invalid-data-file", ["in.jsonl, line 2", "not valid JSON"]),
    "unknown-label": ([ROWS[0], {"text": "x", "label": "neutral"}], "in.jsonl", {}, 422, "unknown-label",
                      ["in.jsonl, line 2", "'label'", "'neutral'"]),
    "label-out-of-range": ([{"text": "x", "label": 7}], "in.jsonl", {}, 422, "unknown-label", ["line 1", "'label'"]),
    "empty": ([], "in.jsonl", {}, 422, "empty-data", ["in.jsonl"]),
    "too-long": ([ROWS[0], {"text": "x" * 4001}], "in.jsonl", {}, 413, "text-too-long", ["in.jsonl, line 2", "'text'"]),
    "wrong-extension": (ROWS, "in.txt", {}, 422, "invalid-data-file", ["in.txt", "format"]),
    "named-label-field-in-no-row": (ROWS, "in.jsonl", {"label_field": "gold"}, 422, "invalid-data-file",
                                    ["in.jsonl", "'gold'", "no row"]),
    "csv-with-more-fields": (None, "in.csv", {}, 422, "invalid-data-file", ["in.csv, line 3", "more fields"]),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_input_file_is_refused_by_file_line_and_field_and_nothing_is_queued(client, redis_client, data_root,  # noqa: F811
                                                                                   case):
    rows, path, fields, status, slug, named = BAD_FILES[case]
    model = ready_model(client, redis_client)
    if rows is not None:
        write_rows(data_root / path, rows)
    if case == "csv-with-more-fields":
        (data_root / path).write_text("text,label\ngood,positive\nbad,negative,extra\n")
    body = {"model_id": model["id"], "inputs_from": {"path": path, **fields}}
    problem = assert_problem(client.post("/v1/influence", json=body), status, slug)
    for words in named:
        assert words in problem["detail"], problem["detail"]
    assert str(data_root.resolve()) not in problem["detail"]
    assert problem["errors"][0]["loc"][:2] == ["body", "inputs_from"]
    assert nothing_queued(redis_client)


def test_a_file_that_is_not_utf8_is_refused_at_its_line(client, redis_client, data_root):  # noqa: F811
    model = ready_model(client, redis_client)
    (data_root / "in.jsonl").write_bytes(b'{"text": "good"}\n{"text": "\xff\xfe"}\n')
    problem = assert_problem(client.post("/v1/influence", json={"model_id": model["id"], "inputs_from": {"path": "in.jsonl"}}),
                             422, "invalid-data-file")
    assert "in.jsonl, line 2: not UTF-8" in problem["detail"]
    assert nothing_queued(redis_client)


def test_a_file_over_the_input_limit_is_413(make_client, redis_client, data_root):  # noqa: F811
    client = make_client(max_dataset_inputs=2)
    model = ready_model(client, redis_client)
    write_rows(data_root / "in.jsonl", ROWS)
    problem = assert_problem(client.post("/v1/influence", json={"model_id": model["id"], "inputs_from": {"path": "in.jsonl"}}),
                             413, "too-many-inputs")
    assert "more than 2 inputs" in problem["detail"] and "line 3" in problem["detail"]
    assert nothing_queued(redis_client)
    # `limit` reads only the first rows: within the limit, accepted.
    accepted = client.post("/v1/influence", json={"model_id": model["id"], "inputs_from": {"path": "in.jsonl", "limit": 2}})
    assert accepted.status_code == 202 and accepted.json()["inputs_total"] == 2


@pytest.mark.parametrize(("route", "body", "words"), [
    ("/v1/influence", {"inputs": [{"text": "x"}], "inputs_from": {"path": "in.jsonl"}}, "exactly one of"),
    ("/v1/influence", {}, "exactly one of"),
    ("/v1/influence", {"inputs_from": {"path": "in.jsonl"}, "group": True}, "'group' and 'parallel'"),
    ("/v1/influence", {"inputs_from": {"path": "in.jsonl"}, "parallel": 2, "solver": "lissa"}, "'group' and 'parallel'"),
    ("/v1/explain", {}, "exactly one of"),
    ("/v1/self-influence", {"inputs_from": {"path": "in.jsonl"}, "sample": 3}, "not with 'sample'"),
    ("/v1/self-influence", {"inputs_from": {"path": "in.jsonl"}, "top": 3}, "not with 'sample'"),
    ("/v1/influence", {"inputs_from": {"path": "in.jsonl", "shard_inputs": 0}}, "greater than or equal to 1"),
])
def test_request_shapes_a_dataset_job_refuses(client, redis_client, data_root, route, body, words):  # noqa: F811
    model = ready_model(client, redis_client)
    write_rows(data_root / "in.jsonl", ROWS)
    problem = assert_problem(client.post(route, json={"model_id": model["id"], **body}), 422, "invalid-request")
    assert words in problem["detail"], problem["detail"]
    assert nothing_queued(redis_client)


def test_an_inline_job_is_not_a_dataset_job(client, redis_client):  # noqa: F811
    model = ready_model(client, redis_client)
    job = client.post("/v1/influence", json={"model_id": model["id"], "inputs": [{"text": "x"}]}).json()
    assert job["inputs_total"] is None
    assert_problem(client.get(f"/v1/jobs/{job['id']}/results"), 409, "job-not-finished")


def test_a_negative_label_is_unknown_and_takes_the_predicted_one(client, redis_client, data_root):  # noqa: F811
    model = ready_model(client, redis_client)
    write_rows(data_root / "test.jsonl", [{"text": "unlabelled, as GLUE's test splits", "label": -1}])
    response = client.post("/v1/influence", json={"model_id": model["id"], "inputs_from": {"path": "test.jsonl"}})
    assert response.status_code == 202, response.text


def test_a_dataset_job_may_not_write_over_its_own_input(client, redis_client, data_root):  # noqa: F811
    model = ready_model(client, redis_client)
    write_rows(data_root / "in.jsonl", ROWS)
    for route in ("/v1/influence", "/v1/self-influence"):
        problem = assert_problem(client.post(route, json={"model_id": model["id"], "inputs_from": {"path": "in.jsonl"},
                                                          "output_path": "./in.jsonl"}), 422, "invalid-request")
        assert problem["errors"][0]["loc"] == ["body", "output_path"]
    assert nothing_queued(redis_client)
