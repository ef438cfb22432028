"""Influence jobs end to end over HTTP: real Redis, real Celery worker processes, the real API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from live_stack import live_stack, wait_for  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

LISSA = {"damp": 0.01, "scale": 1000.0, "depth": 60, "batch_size": 2, "repeats": 1, "seed": 3}


def analyze_json(stack, texts: list[str], labels: list[str] | None = None, k: int = 20, space: str = "gradient") -> dict:
    """``fastif analyze --json`` on the same model, data and settings: the reference."""
    argv = [sys.executable, "-m", "fastif_cli.main", "analyze", "--model", str(stack.data_root / "model"),
            "--train", str(stack.data_root / "train.jsonl"), "--k", str(k), "--top", "5", "--json", "--index-space", space,
            "--damp", str(LISSA["damp"]), "--scale", str(LISSA["scale"]), "--depth", str(LISSA["depth"]),
            "--batch-size", str(LISSA["batch_size"]), "--seed", str(LISSA["seed"])]
    for text in texts:
        argv += ["--text", text]
    for label in labels or []:
        argv += ["--label", label]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_same_influence(http_item: dict, cli_item: dict) -> None:
    assert http_item["prediction"]["label"] == cli_item["prediction"]["label"]
    assert http_item["label_used"] == cli_item["label_used"]
    for side in ("helpful", "harmful"):
        assert [e["train_index"] for e in http_item[side]] == [e["train_index"] for e in cli_item[side]]
        for ours, theirs in zip(http_item[side], cli_item[side]):
            assert ours["score"] == pytest.approx(theirs["score"], rel=1e-5, abs=1e-9)
            assert ours["text"] == theirs["text"] and ours["label"] == theirs["label"]


@pytest.fixture(scope="module")
def model(live_stack):  # noqa: F811
    model = live_stack.register()
    assert model["status"] == "ready", model
    assert model["num_train"] == 60 and model["labels"] == ["negative", "positive"]
    assert model["fingerprint"]
    return model


def test_single_input_job_equals_fastif_analyze(live_stack, model):  # noqa: F811
    job = live_stack.submit({"model_id": model["id"], "inputs": [{"text": "the film was really good"}],
                             "k": 20, "top": 5, "lissa": LISSA})
    assert job["status"] == "queued"
    finished = live_stack.wait_job(job["id"])
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["result_count"] == 1 and finished["started_at"] and finished["finished_at"]
    items = live_stack.results(job["id"])
    assert items[0]["input_index"] == 0
    assert items[0]["diagnostics"]["cached"] is False
    reference = analyze_json(live_stack, ["the film was really good"])
    assert_same_influence(items[0], reference["inputs"][0])
    assert len(reference["inputs"][0]["scores"]) == 20


def test_batch_job_in_input_order_equals_fastif_analyze(live_stack, model):  # noqa: F811
    texts = ["awful boring plot", "a lovely warm story", "the acting was fine but sad"]
    labels = ["negative", "negative", "positive"]
    job = live_stack.submit({"model_id": model["id"], "k": 20, "top": 5, "lissa": LISSA,
                             "inputs": [{"text": t, "label": l} for t, l in zip(texts, labels)]})
    assert live_stack.wait_job(job["id"])["status"] == "succeeded"
    items = live_stack.results(job["id"])
    assert [i["input_index"] for i in items] == [0, 1, 2]
    assert [i["label_used"] for i in items] == labels
    reference = analyze_json(live_stack, texts, labels)
    for ours, theirs in zip(items, reference["inputs"]):
        assert_same_influence(ours, theirs)
    page = live_stack.client.get(f"/v1/jobs/{job['id']}/results", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and [i["input_index"] for i in page["items"]] == [1]


def test_feature_space_model_equals_fastif_analyze_and_has_its_own_cache(live_stack, model):  # noqa: F811
    """The same model and data registered with FastIF's feature index: its own candidates, never the other's results.

    (Its s_test may come from the cache: that does not depend on the index.)"""
    feature = live_stack.register(name="tiny-feature", index={"space": "feature"})
    assert feature["status"] == "ready" and feature["fingerprint"] == model["fingerprint"]
    body = {"inputs": [{"text": "a dull and cold film"}], "k": 12, "top": 5, "lissa": LISSA}
    jobs = {space: live_stack.wait_job(live_stack.submit({**body, "model_id": m["id"]})["id"])
            for space, m in (("gradient", model), ("feature", feature))}
    items = {space: live_stack.results(job["id"])[0] for space, job in jobs.items()}
    for space, item in items.items():
        assert_same_influence(item, analyze_json(live_stack, ["a dull and cold film"], k=12, space=space)["inputs"][0])
    ranked = {space: [e["train_index"] for e in item["helpful"] + item["harmful"]] for space, item in items.items()}
    assert ranked["gradient"] != ranked["feature"]


def test_repeated_request_is_answered_from_the_cache(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "inputs": [{"text": "quite dull film"}], "k": 15, "top": 3, "lissa": LISSA}
    first = live_stack.wait_job(live_stack.submit(body)["id"])
    second = live_stack.wait_job(live_stack.submit(body)["id"])
    assert first["status"] == second["status"] == "succeeded"
    a, b = live_stack.results(first["id"])[0], live_stack.results(second["id"])[0]
    assert a["diagnostics"]["cached"] is False and b["diagnostics"]["cached"] is True
    assert a["helpful"] == b["helpful"] and a["harmful"] == b["harmful"]
    # A different seed is a different question: not a hit.
    third = live_stack.wait_job(live_stack.submit({**body, "lissa": {**LISSA, "seed": 4}})["id"])
    assert live_stack.results(third["id"])[0]["diagnostics"]["cached"] is False


def test_test_gradients_and_s_test_are_cached_in_redis(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "inputs": [{"text": "nice fun story"}], "k": 10, "top": 3,
            "lissa": {**LISSA, "seed": 11}}
    assert live_stack.wait_job(live_stack.submit(body)["id"])["status"] == "succeeded"
    keys = live_stack.redis.keys(f"fastif:v1:{model['fingerprint']}:*")
    kinds = {key.split(":")[3] for key in keys}
    assert {"grad", "s_test", "result"} <= kinds
    for key in keys:
        assert 0 < live_stack.redis.ttl(key) <= 86400


def test_running_job_reports_progress_and_can_be_cancelled(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "inputs": [{"text": "the plot was weak"}], "k": 10,
            "lissa": {**LISSA, "depth": 100000, "seed": 5}}
    job = live_stack.submit(body)
    running = wait_for(lambda: live_stack.client.get(f"/v1/jobs/{job['id']}").json(),
                       lambda j: j["status"] == "running" and j["progress"]["stage"] == "s_test"
                       and j["progress"]["done"] > 0, timeout_s=120)
    assert running["progress"]["total"] == 100000
    response = live_stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    final = live_stack.wait_job(job["id"], timeout_s=60)
    assert final["status"] == "cancelled", final["error"]
    assert final["progress"]["done"] < 100000
    response = live_stack.client.get(f"/v1/jobs/{job['id']}/results")
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")


def test_diverging_lissa_fails_the_job_with_the_knob_to_turn(live_stack, model):  # noqa: F811
    body = {"model_id": model["id"], "inputs": [{"text": "the plot was weak"}], "k": 10,
            "lissa": {**LISSA, "scale": 1e-3, "damp": 0.001, "depth": 500}}
    final = live_stack.wait_job(live_stack.submit(body)["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "lissa-diverged"
    assert "scale" in final["error"]["message"]


def test_job_list_shows_recent_jobs(live_stack, model):  # noqa: F811
    listing = live_stack.client.get("/v1/jobs", params={"status": "succeeded", "limit": 5}).json()
    assert listing["items"] and all(j["status"] == "succeeded" for j in listing["items"])


def test_the_build_measured_the_curvature_and_the_default_is_ekfac(live_stack, model):  # noqa: F811
    """The record shows the spectrum the build measured; a default job is EK-FAC (λ of each block 10 × its mean
    eigenvalue) with the factors the build fitted, and equals ``fastif analyze`` with its defaults (which fits its own)."""
    curvature = model["curvature"]
    spectrum = curvature["spectra"]["gauss-newton"]
    assert spectrum["largest"] > spectrum["mean"] > 0 and spectrum["examples"] == 60
    assert curvature["ekfac_examples"] == 60 and curvature["ekfac_uncovered"] == []
    text = "a warm and lovely story"
    job = live_stack.wait_job(live_stack.submit({"model_id": model["id"], "inputs": [{"text": text}], "k": 20,
                                                 "top": 5})["id"])
    assert job["status"] == "succeeded", job["error"]
    item = live_stack.results(job["id"])[0]
    diagnostics = item["diagnostics"]
    assert diagnostics["solver"] == "ekfac" and diagnostics["curvature"] == "gauss-newton" and diagnostics["converged"]
    assert (diagnostics["damping_scope"], diagnostics["damping_ratio"]) == ("block", 10.0) and diagnostics["damping"] > 0
    assert diagnostics["inverse_rank_tolerance"] == 1e-3
    argv = [sys.executable, "-m", "fastif_cli.main", "analyze", "--model", str(live_stack.data_root / "model"),
            "--train", str(live_stack.data_root / "train.jsonl"), "--k", "20", "--top", "5", "--json", "--text", text]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_influence(item, json.loads(done.stdout)["inputs"][0])


def test_every_solver_answers_and_names_itself(live_stack, model):  # noqa: F811
    for solver in ("kfac", "cg", "identity", "lissa"):
        body = {"model_id": model["id"], "inputs": [{"text": "quite dull film"}], "k": 10, "top": 3, "solver": solver,
                "lissa": {"depth": 20, "batch_size": 2}, "cg": {"max_iter": 50}}
        job = live_stack.wait_job(live_stack.submit(body)["id"])
        assert job["status"] == "succeeded", (solver, job["error"])
        diagnostics = live_stack.results(job["id"])[0]["diagnostics"]
        assert diagnostics["solver"] == solver and isinstance(diagnostics["converged"], bool)
        if solver == "cg":
            assert diagnostics["relative_residual"] is not None and diagnostics["iterations"] >= 1
