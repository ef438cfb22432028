"""FastIF's application jobs end to end: real Redis, real Celery worker processes, the real API.

explain, graph (JSON, PNG, SVG), correct (training set and pool, save_as) and
self-influence, on tiny constructed tasks whose right answers are known.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import httpx
import pytest
import redis

from conftest import _FLUSH_KEEP_LOCK, LOCK_KEY, LOCK_TTL_S

from app_tasks import LABELS, MARKER, noisy_task, reviews, twist_task
from fastif_cli.stack import free_port, start_stack
from live_stack import wait_for

pytestmark = pytest.mark.integration

LISSA = {"damp": 0.01, "scale": 100.0, "depth": 100, "batch_size": 4, "seed": 0}


class Api:
    def __init__(self, client: httpx.Client, root):
        self.client, self.root = client, root

    def post(self, path: str, body: dict, expect: int = 202) -> dict:
        response = self.client.post(path, json=body)
        assert response.status_code == expect, response.text
        if expect == 202 and path != "/v1/models":
            assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        return response.json()

    def wait(self, job_id: str, timeout_s: float = 300) -> dict:
        return wait_for(lambda: self.client.get(f"/v1/jobs/{job_id}").json(),
                        lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout_s=timeout_s, interval_s=0.2)

    def run(self, path: str, body: dict, timeout_s: float = 300) -> tuple[dict, list[dict]]:
        job = self.wait(self.post(path, body)["id"], timeout_s)
        assert job["status"] == "succeeded", job["error"]
        page = self.client.get(f"/v1/jobs/{job['id']}/results", params={"limit": 1000}).json()
        return job, page["items"]

    def register(self, name: str, model_path: str, train: str) -> dict:
        model = self.post("/v1/models", {"name": name, "model_path": model_path, "train_data": {"path": train}})
        return self.wait_model(model["id"])

    def wait_model(self, model_id: str) -> dict:
        model = wait_for(lambda: self.client.get(f"/v1/models/{model_id}").json(),
                         lambda m: m["status"] != "building", timeout_s=180, interval_s=0.2)
        assert model["status"] == "ready", model
        return model


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url) -> Iterator[tuple[Api, dict, dict]]:
    root = tmp_path_factory.mktemp("app-root")
    twist, noisy = twist_task(root), noisy_task(root)
    # Empty the DB but keep the session's claim on it (see conftest).
    _client = redis.Redis.from_url(redis_url, decode_responses=True)
    _client.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, _client.get(LOCK_KEY) or "held", LOCK_TTL_S)
    procs, url, _ = start_stack("127.0.0.1", free_port(), workers=2, log_dir=tmp_path_factory.mktemp("app-logs"),
                                extra_env={"REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root)})
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            api = Api(client, root)
            twist["record"] = api.register("twist", twist["model"], twist["train"])
            noisy["record"] = api.register("noisy", noisy["model"], noisy["train"])
            yield api, twist, noisy
    finally:
        procs.stop(grace_s=10)


def test_explain_gives_prediction_examples_and_label_agreement(stack):
    api, twist, _ = stack
    body = {"model_id": twist["record"]["id"], "k": 50, "top": 5, "lissa": LISSA,
            "inputs": [{"text": "a great and lovely film"}, {"text": "boring and sad plot", "label": "positive"}]}
    job, items = api.run("/v1/explain", body)
    assert job["kind"] == "explain" and len(items) == 2
    first, second = items
    assert first["prediction"]["label"] == "positive" and first["label_used"] == "positive"
    assert second["label_used"] == "positive" and second["prediction"]["label"] == "negative"
    for item in items:
        assert len(item["helpful"]) <= 5 and all(e["score"] < 0 for e in item["helpful"])
        assert len(item["harmful"]) <= 5 and all(e["score"] > 0 for e in item["harmful"])
        assert all(e["text"] and e["label"] in LABELS for e in item["helpful"] + item["harmful"])
        agreement = item["agreement"]
        predicted = item["prediction"]["label"]
        assert agreement["predicted_label"] == predicted
        assert agreement["helpful"] == len(item["helpful"])
        assert agreement["helpful_with_predicted_label"] == sum(e["label"] == predicted for e in item["helpful"])
    # Reviews that look like the input and carry its label help it; for the wrong label they harm it.
    assert len(second["harmful"]) == 5
    assert first["agreement"]["helpful_with_predicted_label"] >= 3
    # The same request again comes from the cache.
    _, again = api.run("/v1/explain", body)
    assert again[0]["diagnostics"]["cached"] is True and again[0]["helpful"] == first["helpful"]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_graph_json_png_and_svg(stack):
    api, twist, _ = stack
    inputs = [{"text": "a great and lovely film", "group": "praise"}, {"text": "nice warm story", "group": "praise"},
              {"text": "boring and sad plot", "group": "complaints"}]
    job, items = api.run("/v1/graph", {"model_id": twist["record"]["id"], "k": 60, "top": 3, "lissa": LISSA,
                                       "inputs": inputs})
    assert len(items) == 1
    graph = items[0]
    ids = {n["id"] for n in graph["nodes"]}
    assert {"input-0", "input-1", "input-2"} <= ids
    assert graph["groups"] == ["praise", "complaints"]
    train_ids = {n["id"] for n in graph["nodes"] if n["kind"] == "train"}
    assert train_ids == {e["source"] for e in graph["edges"]}
    assert {e["target"] for e in graph["edges"]} <= {"input-0", "input-1", "input-2"}
    for i in range(3):
        mine = [e for e in graph["edges"] if e["target"] == f"input-{i}"]
        assert 0 < len(mine) <= 6
        assert all((e["score"] < 0) == (e["sign"] == "helpful") for e in mine)

    png = api.client.get(graph["images"]["png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    width, height = _png_size(png.content)
    assert width >= 600 and height >= 600
    svg = api.client.get(f"/v1/jobs/{job['id']}/graph.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    tree = ET.fromstring(svg.content)
    assert tree.tag.endswith("svg")
    drawn = {el.get("id")[len("node-"):] for el in tree.iter() if (el.get("id") or "").startswith("node-")}
    assert drawn == ids
    text = svg.content.decode()
    assert "helpful" in text and "harmful" in text  # the legend

    # A threshold keeps only the strong edges.
    strongest = max(abs(e["score"]) for e in graph["edges"])
    _, (pruned,) = api.run("/v1/graph", {"model_id": twist["record"]["id"], "k": 60, "top": 3, "lissa": LISSA,
                                         "inputs": inputs, "threshold": strongest * 0.5})
    assert 0 < len(pruned["edges"]) < len(graph["edges"])
    assert all(abs(e["score"]) >= strongest * 0.5 for e in pruned["edges"])


def test_graph_pictures_only_for_finished_graph_jobs(stack):
    api, twist, _ = stack
    job, _ = api.run("/v1/explain", {"model_id": twist["record"]["id"], "k": 20, "top": 2, "lissa": LISSA,
                                     "inputs": [{"text": "quite dull"}]})
    response = api.client.get(f"/v1/jobs/{job['id']}/graph.png")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert api.client.get("/v1/jobs/nope/graph.svg").status_code == 404


def _correction_body(twist: dict, **extra) -> dict:
    """Single-shot (one round on every anchor) unless ``extra`` says otherwise."""
    return {"model_id": twist["record"]["id"], "anchors": twist["anchors"], "evaluation": {"path": twist["eval"]},
            "num_points": 8, "lr": 0.2, "steps": 3, "rounds": 1, "trials": 3, "lissa": LISSA, **extra}


def test_correct_with_training_points(stack):
    """The 8 "twist" reviews of the training set are the helpful points; they fix the model, random ones do not."""
    api, twist, _ = stack
    _, (report,) = api.run("/v1/correct", _correction_body(twist, candidates={"k": None}))
    assert report["evaluation"]["size"] == 40 and report["evaluation"]["before"]["accuracy"] < 0.2
    assert report["candidates"] == {"source": "train", "size": twist["num_train"], "k": None}
    helpful, harmful, random_ = (report["strategies"][s] for s in ("helpful", "harmful", "random"))
    assert len(helpful["trials"]) == len(random_["trials"]) == 3
    found = set(helpful["trials"][0]["points"]) & set(twist["fix_train_indices"])
    assert len(found) >= 6, helpful["trials"][0]["points"]
    assert all(MARKER in p["text"] for p in helpful["first_trial_points"][:6])
    assert helpful["delta_accuracy"]["mean"] >= 0.5
    assert helpful["delta_loss"]["mean"] < 0
    assert random_["delta_accuracy"]["mean"] <= 0.15
    assert helpful["delta_accuracy"]["mean"] > random_["delta_accuracy"]["mean"] + 0.3
    assert harmful["delta_accuracy"]["mean"] <= 0.05 and harmful["delta_loss"]["mean"] >= 0
    assert report["saved_model"] is None


def test_correct_with_a_pool_and_save_the_corrected_model(stack):
    api, twist, _ = stack
    evaluation = {"examples": [{"text": r["text"], "label": r["label"]} for r in twist["evaluation"][:20]]}
    body = _correction_body(twist, evaluation=evaluation, candidates={"pool": twist["pool"], "k": None},
                            strategies=["helpful", "random"], trials=2, save_as="twist-fixed")
    _, (report,) = api.run("/v1/correct", body)
    assert report["candidates"]["source"] == "pool" and report["candidates"]["size"] == 48
    assert set(report["strategies"]) == {"helpful", "random"}
    helpful = report["strategies"]["helpful"]
    assert len(set(helpful["trials"][0]["points"]) & set(twist["fix_pool_indices"])) >= 6
    assert helpful["delta_accuracy"]["mean"] >= 0.5
    assert helpful["delta_accuracy"]["mean"] > report["strategies"]["random"]["delta_accuracy"]["mean"] + 0.3

    saved = report["saved_model"]
    assert saved["name"] == "twist-fixed" and saved["model_path"].startswith("corrected/twist-fixed-")
    assert any((api.root / saved["model_path"]).glob("*.safetensors"))
    corrected = api.wait_model(saved["model_id"])
    assert corrected["num_train"] == twist["num_train"]
    # The corrected model gets the anchors' kind of input right; the original did not.
    probe = {"inputs": [{"text": r["text"]} for r in reviews(6, seed=99, marker=True)], "k": 10, "top": 1, "lissa": LISSA}
    _, before = api.run("/v1/explain", {"model_id": twist["record"]["id"], **probe})
    _, after = api.run("/v1/explain", {"model_id": corrected["id"], **probe})
    assert sum(i["prediction"]["label"] == "negative" for i in after) > sum(i["prediction"]["label"] == "negative" for i in before)
    assert sum(i["prediction"]["label"] == "negative" for i in after) >= 4


def test_correct_round_by_round(stack):
    """FastIF's protocol: fresh anchors per round, influence on the updated model, signs kept, a report that adds up."""
    api, twist, _ = stack
    model_id = twist["record"]["id"]
    probe = {"model_id": model_id, "inputs": [{"text": r["text"]} for r in reviews(3, seed=77)], "top": 1}
    _, before = api.run("/v1/explain", {**probe, "k": 10})
    anchors = [{"text": r["text"], "label": r["label"]} for r in reviews(6, seed=8, marker=True)]
    control = {"examples": [{"text": r["text"], "label": r["label"]} for r in reviews(20, seed=21)]}
    body = _correction_body(twist, anchors=anchors, rounds=3, anchors_per_round=2, steps=1, num_points=4, trials=2,
                            candidates={"k": 40}, control=control)
    job, (report,) = api.run("/v1/correct", body)
    assert report["control"]["size"] == 20
    assert all(sum(map(sum, t["final"]["control"]["confusion"])) == 20
               for s in report["strategies"].values() for t in s["trials"])
    assert report["settings"]["rounds"] == 3 and report["anchors"] == {**report["anchors"], "count": 6, "per_round": 2}
    helpful, harmful = report["strategies"]["helpful"], report["strategies"]["harmful"]
    for trial in helpful["trials"]:
        assert all(p["score"] < 0 for r in trial["rounds"] for p in r["points"])
        assert len({r["s_test_norm"] for r in trial["rounds"]}) == 3  # recomputed on the model as it moves
    assert all(p["score"] > 0 for t in harmful["trials"] for r in t["rounds"] for p in r["points"])
    assert [r["anchors"] for r in helpful["trials"][0]["rounds"]] != [r["anchors"] for r in helpful["trials"][1]["rounds"]]
    size = report["evaluation"]["size"]
    for strategy in report["strategies"].values():
        assert len(strategy["by_round"]) == 3 and len(strategy["delta_accuracy"]["values"]) == 2
        for trial in strategy["trials"]:
            for outcome in [*trial["rounds"], trial["final"]]:
                assert sum(map(sum, outcome["confusion"])) == size
                assert sum(v["count"] for v in outcome["per_label"].values()) == size
    assert helpful["delta_accuracy"]["mean"] > report["strategies"]["random"]["delta_accuracy"]["mean"]
    # The plot of accuracy by round.
    assert report["plot"] == f"/v1/jobs/{job['id']}/correction.png"
    picture = api.client.get(report["plot"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", picture.content[16:24])[0] > 300
    assert api.client.get(f"/v1/jobs/{job['id']}/graph.png").status_code == 404
    # The registered model is as it was, on whichever worker answers (distinct k: no cached result).
    for k in (11, 12, 13, 14):
        _, after = api.run("/v1/explain", {**probe, "k": k})
        assert [i["prediction"] for i in after] == [i["prediction"] for i in before]


def test_correct_refuses_bad_requests(stack):
    api, twist, _ = stack
    both = _correction_body(twist, evaluation={"path": twist["eval"], "examples": [{"text": "a", "label": 0}]})
    assert api.client.post("/v1/correct", json=both).status_code == 422
    outside = api.client.post("/v1/correct", json=_correction_body(twist, evaluation={"path": "../etc/passwd"}))
    assert outside.status_code == 422 and outside.json()["type"].endswith("/path-outside-data-root")
    missing = api.client.post("/v1/correct", json=_correction_body(twist, candidates={"pool": "nope.jsonl"}))
    assert missing.status_code == 422 and missing.json()["type"].endswith("/path-not-found")
    unlabelled = _correction_body(twist, anchors=[{"text": "a twist"}])
    assert api.client.post("/v1/correct", json=unlabelled).status_code == 422
    wrong_label = _correction_body(twist, anchors=[{"text": "a twist", "label": "sarcastic"}])
    assert api.client.post("/v1/correct", json=wrong_label).json()["type"].endswith("/unknown-label")
    assert api.client.post("/v1/correct", json=_correction_body(twist, save_as="../x")).status_code == 422
    (api.root / "empty.jsonl").write_text("")
    queued = len(api.client.get("/v1/jobs", params={"limit": 1000}).json()["items"])
    for bad, slug in [
        ({"rounds": 0}, "invalid-request"),
        ({"anchors_per_round": len(twist["anchors"]) + 1}, "invalid-request"),
        ({"anchors": {"examples": twist["anchors"]}, "anchors_per_round": 99}, "invalid-request"),
        ({"anchors": [{"text": "a twist", "label": 7}]}, "unknown-label"),
        ({"anchors": {"path": "empty.jsonl"}}, "empty-data"),
        ({"evaluation": {"examples": []}}, "invalid-request"),
        ({"evaluation": {"path": "empty.jsonl"}}, "empty-data"),
        ({"optimizer": "rmsprop"}, "invalid-request"),
        ({"strategies": ["random"], "save_as": "x"}, "invalid-request"),
    ]:
        answer = api.client.post("/v1/correct", json=_correction_body(twist, **bad))
        assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json", (bad, answer.text)
        assert answer.json()["type"].endswith("/" + slug), (bad, answer.json())
    assert len(api.client.get("/v1/jobs", params={"limit": 1000}).json()["items"]) == queued  # nothing queued
    unknown = api.client.post("/v1/explain", json={"model_id": "nope", "inputs": [{"text": "x"}]})
    assert unknown.status_code == 404 and unknown.json()["type"].endswith("/model-not-found")


def _precision(items: list[dict], planted: list[int]) -> float:
    top = {i["train_index"] for i in items[: len(planted)]}
    return len(top & set(planted)) / len(planted)


def test_self_influence_ranks_planted_mislabels_first(stack):
    api, _, noisy = stack
    body = {"model_id": noisy["record"]["id"], "solver": "lissa", "chunk": 40, "lissa": {**LISSA, "depth": 40}}
    job, items = api.run("/v1/self-influence", body)
    assert job["result_count"] == noisy["num_train"] == len(items)
    assert [i["rank"] for i in items] == list(range(len(items)))
    values = [i["self_influence"] for i in items]
    assert values == sorted(values) and values[0] < 0
    assert sorted(i["train_index"] for i in items) == list(range(noisy["num_train"]))
    assert _precision(items, noisy["flipped"]) >= 0.6, [i["train_index"] for i in items[:10]]
    # The cheap baseline without the Hessian, a sample, and a cut of the ranking.
    _, identity = api.run("/v1/self-influence", {**body, "solver": "identity"})
    assert _precision(identity, noisy["flipped"]) >= 0.6
    _, sample = api.run("/v1/self-influence", {**body, "sample": 20, "seed": 3, "top": 5})
    assert len(sample) == 5
    _, chosen = api.run("/v1/self-influence", {**body, "indices": noisy["flipped"][:3] + [0, 1]})
    assert {i["train_index"] for i in chosen} == set(noisy["flipped"][:3] + [0, 1])
    bad = api.client.post("/v1/self-influence", json={**body, "indices": [10_000]})
    assert bad.status_code == 422
