"""The quality job end to end: real Redis, a real Celery worker process, the real API.

- its LDS per configuration equals a loop written out here: the engine in-process on the
  same tiny model and data, scores from per-example gradients (identity: ⟨∇L(z_i), ∇L(z_t)⟩/λ;
  EK-FAC: the engine's s_test), subset sums and scipy's spearmanr per input;
- the report lands on GET /v1/models/{id}; the default configurations all run;
- a running job is cancelled between retrainings and leaves the model's report alone;
- bad requests are 4xx problems with a stable type, and queue nothing;
- the route is in the OpenAPI document with its body and its problems.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis
from scipy.stats import spearmanr

from conftest import _FLUSH_KEEP_LOCK, LOCK_KEY, LOCK_TTL_S

from api_schemas import ModelCreate, QualityReport
from fastif_cli.stack import free_port, start_stack
from live_stack import wait_for
from records.celery_app import QUALITY, make_celery
from records.models import ModelStore
from records.settings import settings_from
from tiny import LABELS, make_tiny_bert, sentences, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

PROBLEM = "https://fastif.dev/problems/"
NUM_TRAIN = 30
SAMPLE = 24
HELD_OUT = [{"text": "the movie was really great", "label": "positive"},
            {"text": "a dull and boring story", "label": 0},
            {"text": "quite fun but cold", "label": "positive"},
            {"text": "the acting was poor and sad", "label": "negative"}]
DAMPING = 0.1
# Adam at a large rate for this tiny model: the retrained losses move far beyond rounding,
# so the ranks over subsets do not depend on the order of floating-point sums.
RETRAIN = {"epochs": 2, "lr": 0.01, "batch_size": 8, "optimizer": "adam", "schedule": "constant"}
BODY = {"held_out": HELD_OUT, "train_sample": SAMPLE, "subsets": 6, "fraction": 0.5, "seeds": 2, "seed": 3,
        "retrain": RETRAIN, "knn_k": 10, "top": 3,
        "configurations": [{"name": "identity", "solver": "identity", "damping": DAMPING},
                           {"name": "ekfac", "solver": "ekfac", "damping": DAMPING}]}


class Api:
    def __init__(self, client: httpx.Client, root, redis_url: str):
        self.client, self.root, self.redis_url = client, root, redis_url

    def start(self, model_id: str, body: dict) -> dict:
        response = self.client.post(f"/v1/models/{model_id}/quality", json=body)
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        return response.json()

    def wait(self, job_id: str, timeout_s: float = 240) -> dict:
        return wait_for(lambda: self.client.get(f"/v1/jobs/{job_id}").json(),
                        lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout_s=timeout_s,
                        interval_s=0.2)

    def run(self, model_id: str, body: dict) -> tuple[dict, dict]:
        job = self.wait(self.start(model_id, body)["id"])
        assert job["status"] == "succeeded", job["error"]
        items = self.client.get(f"/v1/jobs/{job['id']}/results").json()["items"]
        assert len(items) == 1
        return job, items[0]

    def jobs(self) -> list[dict]:
        return self.client.get("/v1/jobs", params={"limit": 1000}).json()["items"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url) -> Iterator[tuple[Api, dict]]:
    root = tmp_path_factory.mktemp("quality-root")
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(NUM_TRAIN, seed=2, noise=0.1))
    write_jsonl(root / "held-out.jsonl", sentences(5, seed=9))
    # Empty the DB but keep the session's claim on it (see conftest).
    _client = redis.Redis.from_url(redis_url, decode_responses=True)
    _client.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, _client.get(LOCK_KEY) or "held", LOCK_TTL_S)
    procs, url, _ = start_stack("127.0.0.1", free_port(), workers=1, log_dir=tmp_path_factory.mktemp("quality-logs"),
                                extra_env={"REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root)},
                                threads_per_worker=1)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            api = Api(client, root, redis_url)
            response = client.post("/v1/models", json={"name": "tiny-quality", "model_path": "model",
                                                       "train_data": {"path": "train.jsonl"}})
            assert response.status_code == 202, response.text
            model = wait_for(lambda: client.get(f"/v1/models/{response.json()['id']}").json(),
                             lambda m: m["status"] != "building", timeout_s=180, interval_s=0.2)
            assert model["status"] == "ready", model
            yield api, model
    finally:
        procs.stop(grace_s=10)


# -- the LDS against a loop written out here --------------------------------------------------------
def _naive(root) -> dict:
    """Everything the report holds for BODY, computed in this process without the service."""
    from fastif import DataSpec, InfluenceEngine, Query
    from fastif.config import SolverConfig
    from fastif.quality import RetrainConfig, random_subsets, retrained_test_losses

    engine = InfluenceEngine.from_paths(root / "model", DataSpec(str(root / "train.jsonl")), device="cpu")
    engine.prepare()
    assert engine.num_train == NUM_TRAIN
    # The sample rule QualityRequest documents.
    sample = np.sort(np.random.default_rng([BODY["seed"], 1]).choice(NUM_TRAIN, size=SAMPLE, replace=False))
    small = random_subsets(SAMPLE, BODY["subsets"], BODY["fraction"], BODY["seed"])
    masks = np.zeros((len(small), NUM_TRAIN), dtype=bool)
    masks[:, sample] = small
    queries = [Query(h["text"], label=h["label"]) for h in HELD_OUT]
    config = RetrainConfig(epochs=RETRAIN["epochs"], batch_size=RETRAIN["batch_size"], lr=RETRAIN["lr"],
                           optimizer=RETRAIN["optimizer"], schedule=RETRAIN["schedule"], seeds=BODY["seeds"],
                           seed=BODY["seed"])
    losses = retrained_test_losses(engine, masks, queries, config)  # [subsets, seeds, q]

    # Per-example gradients of every training example (gold label) and of every held-out input.
    train = engine.test_gradients(engine.encode([Query(e.text, e.text_pair, e.label) for e in engine.train]))
    tests = engine.test_gradients(engine.encode(queries))
    s_tests = {"identity": tests / DAMPING,
               "ekfac": engine.solve(tests, SolverConfig(solver="ekfac", damping=DAMPING)).vectors}
    full = {name: -(s.double() @ train.double().T).numpy() for name, s in s_tests.items()}  # [q, N]

    def spearman(a, b) -> float:
        rho = spearmanr(a, b).statistic
        return 0.0 if np.isnan(rho) else float(rho)

    out = {"lds": {}, "per_input": {}, "agreement": {}}
    for name, scores in full.items():
        rhos = []
        for t in range(len(queries)):
            sums = [sum(scores[t, i] for i in range(NUM_TRAIN) if masks[j, i]) for j in range(len(masks))]
            mean_losses = [losses[j, :, t].mean() for j in range(len(masks))]
            rhos.append(spearman(sums, mean_losses))
        out["per_input"][name], out["lds"][name] = rhos, float(np.mean(rhos))
        out["agreement"][name] = float(np.mean([spearman(full["identity"][t, sample], scores[t, sample])
                                                for t in range(len(queries))]))
    out["noise"] = float(np.mean([spearman(losses[:, 0, t], losses[:, 1, t]) for t in range(len(queries))]))
    # kNN recall of the reference (the first configuration: no "default" here) over the whole training set.
    encoded = engine.encode(queries)
    recall = []
    for t in range(len(queries)):
        order = np.argsort(full["identity"][t], kind="stable")
        wanted = set(order[: BODY["top"]].tolist()) | set(order[::-1][: BODY["top"]].tolist())
        found = set(engine.candidates(encoded.search(t), BODY["knn_k"]).indices.tolist())
        recall.append(len(wanted & found) / len(wanted))
    out["recall"] = recall
    return out


def test_lds_equals_a_naive_loop_and_the_report_is_on_the_model(stack):
    api, model = stack
    job, report = api.run(model["id"], BODY)
    assert job["kind"] == "quality" and job["model_id"] == model["id"] and job["result_count"] == 1
    QualityReport.model_validate(report)
    assert report["sizes"] == {"num_train": NUM_TRAIN, "train_sample": SAMPLE, "subset_size": SAMPLE // 2,
                               "subsets": 6, "seeds": 2, "held_out": len(HELD_OUT)}
    assert report["reference"] == "identity" and report["job_id"] == job["id"]
    by_name = {c["name"]: c for c in report["configurations"]}
    assert list(by_name) == ["identity", "ekfac"]

    naive = _naive(api.root)
    for name in ("identity", "ekfac"):
        item = by_name[name]
        assert item["error"] is None and item["same_as"] is None and item["constant"] == 0
        assert item["lds"] == pytest.approx(naive["lds"][name], abs=1e-6), (name, item["per_input"], naive["per_input"][name])
        np.testing.assert_allclose(item["per_input"], naive["per_input"][name], atol=1e-6, err_msg=name)
        rhos = np.asarray(naive["per_input"][name])
        assert item["lds_stderr"] == pytest.approx(rhos.std(ddof=1) / math.sqrt(len(rhos)), abs=1e-6)
        assert item["seconds_per_query"] > 0
        assert report["solver_agreement"][name] == pytest.approx(naive["agreement"][name], abs=1e-6)
        assert item["settings"]["solver"] == name and item["settings"]["damping"] == DAMPING
    assert by_name["identity"]["seconds_fit"] is None and by_name["ekfac"]["seconds_fit"] is not None
    assert report["solver_agreement"]["identity"] == pytest.approx(1.0)
    assert report["retraining_noise"] == pytest.approx(naive["noise"], abs=1e-6)
    assert report["best"] == max(by_name, key=lambda n: by_name[n]["lds"])
    recall = report["knn_recall"]
    assert (recall["k"], recall["top"], recall["space"], recall["reference"]) == (10, 3, "gradient", "identity")
    np.testing.assert_allclose(recall["per_input"], naive["recall"], atol=1e-12)
    assert recall["mean"] == pytest.approx(np.mean(naive["recall"]))
    assert set(report["seconds"]) >= {"retraining", "scoring", "knn_recall", "total"}

    # The latest report is on the model record.
    shown = api.client.get(f"/v1/models/{model['id']}").json()["quality"]
    assert shown == report


def test_default_configurations_from_a_file(stack):
    api, model = stack
    body = {"held_out_from": {"path": "held-out.jsonl", "limit": 3}, "subsets": 4, "seeds": 1,
            "retrain": {"epochs": 1}, "knn_k": 5}
    job, report = api.run(model["id"], body)
    names = [c["name"] for c in report["configurations"]]
    assert names == ["default", "fastif_paper", "cg", "ekfac", "identity"]
    assert report["reference"] == "default"
    assert report["sizes"]["train_sample"] == NUM_TRAIN and report["sizes"]["held_out"] == 3
    for item in report["configurations"]:
        assert item["error"] is None, item
        assert len(item["per_input"]) == 3 and -1 <= item["lds"] <= 1
    # EK-FAC with the default settings is the default: measured once.
    by_name = {c["name"]: c for c in report["configurations"]}
    assert by_name["ekfac"]["same_as"] == "default" and by_name["ekfac"]["lds"] == by_name["default"]["lds"]
    assert by_name["fastif_paper"]["settings"]["lissa"]["scale"] == 1e4
    assert by_name["fastif_paper"]["solver"]["solver"] == "lissa"
    assert report["retraining_noise"] is None  # one seed
    assert report["knn_recall"]["k"] == 5
    assert set(report["solver_agreement"]) == set(names) and report["solver_agreement"]["default"] == pytest.approx(1.0)
    assert api.client.get(f"/v1/models/{model['id']}").json()["quality"]["job_id"] == job["id"]


def test_cancel_while_retraining_keeps_the_last_report(stack):
    api, model = stack
    before = api.client.get(f"/v1/models/{model['id']}").json()["quality"]
    body = {**BODY, "subsets": 400, "retrain": {**RETRAIN, "epochs": 30}}
    job = api.start(model["id"], body)
    wait_for(lambda: api.client.get(f"/v1/jobs/{job['id']}").json(),
             lambda j: j["progress"]["stage"] == "retraining" and j["progress"]["done"] > 0, timeout_s=120)
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    final = api.wait(job["id"], timeout_s=60)
    assert final["status"] == "cancelled"
    assert final["progress"]["done"] < final["progress"]["total"]
    assert api.client.get(f"/v1/models/{model['id']}").json()["quality"] == before


# -- bad input ----------------------------------------------------------------------------------------
def _problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + slug, body
    assert body["status"] == status and body["detail"]
    return body


def test_bad_requests_are_problems_and_queue_nothing(stack):
    api, model = stack
    store = ModelStore(redis.Redis.from_url(api.redis_url, decode_responses=True))
    create = ModelCreate(name="fake", model_path="model", train_data={"path": "train.jsonl"})
    small = store.create(create)
    store.set_ready(small.id, "fp-small", 12, LABELS)
    building = store.create(create)
    valid = {"held_out": HELD_OUT[:2]}
    cases = [
        # pydantic: the contract itself
        (model["id"], {**valid, "configurations": [{"name": "x", "solver": "magic"}]}, 422, "invalid-request"),
        (model["id"], {**valid, "configurations": [{"name": "x", "curvature": "fisher"}]}, 422, "invalid-request"),
        (model["id"], {**valid, "configurations": [{"name": "a"}, {"name": "a"}]}, 422, "invalid-request"),
        (model["id"], {**valid, "configurations": []}, 422, "invalid-request"),
        (model["id"], {"held_out": []}, 422, "invalid-request"),
        (model["id"], {}, 422, "invalid-request"),
        (model["id"], {**valid, "held_out_from": {"path": "held-out.jsonl"}}, 422, "invalid-request"),
        (model["id"], {"held_out": [{"text": "no label"}]}, 422, "invalid-request"),
        (model["id"], {**valid, "train_sample": 19}, 422, "invalid-request"),
        (model["id"], {**valid, "subsets": 3}, 422, "invalid-request"),
        (model["id"], {**valid, "fraction": 1.0}, 422, "invalid-request"),
        (model["id"], {**valid, "seeds": True}, 422, "invalid-request"),
        (model["id"], {**valid, "retrain": {"optimizer": "lion"}}, 422, "invalid-request"),
        (model["id"], {**valid, "surprise": 1}, 422, "invalid-request"),
        # against the model record
        (model["id"], {"held_out": [{"text": "x", "label": "sarcastic"}]}, 422, "unknown-label"),
        (model["id"], {"held_out": [{"text": "x", "label": 2}]}, 422, "unknown-label"),
        (small.id, valid, 422, "too-few-training-examples"),
        (model["id"], {**valid, "fraction": 0.99}, 422, "too-few-training-examples"),
        (model["id"], {**valid, "fraction": 0.02, "subsets": 1000}, 422, "too-few-training-examples"),
        (model["id"], {"held_out_from": {"path": "../etc/passwd"}}, 422, "path-outside-data-root"),
        (model["id"], {"held_out_from": {"path": "/etc/passwd"}}, 422, "path-outside-data-root"),
        (model["id"], {"held_out_from": {"path": "nope.jsonl"}}, 422, "path-not-found"),
        ("no-such-model", valid, 404, "model-not-found"),
        (building.id, valid, 409, "model-not-ready"),
    ]
    jobs_before = api.jobs()
    try:
        for model_id, body, status, slug in cases:
            problem = _problem(api.client.post(f"/v1/models/{model_id}/quality", json=body), status, slug)
            if slug == "too-few-training-examples":
                assert problem["errors"][0]["type"] == "too_few_training_examples"
        too_many = api.client.post(f"/v1/models/{model['id']}/quality", json={"held_out": HELD_OUT * 2000})
        assert too_many.status_code in (413, 422)
        assert too_many.headers["content-type"].startswith("application/problem+json")
        # No refused request left a job record (the task is only ever sent for a recorded job).
        assert api.jobs() == jobs_before
    finally:
        store.delete(small.id)
        store.delete(building.id)


def test_the_task_is_routed_like_the_other_application_jobs() -> None:
    app = make_celery(settings_from(redis_url="redis://127.0.0.1:6379/5"))
    assert QUALITY == "fastif.quality" and app.amqp.router.route({}, QUALITY)["queue"].name == "accel"


def test_the_route_is_in_the_openapi_document(stack):
    api, _ = stack
    document = api.client.get("/openapi.json").json()
    operation = document["paths"]["/v1/models/{model_id}/quality"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/QualityRequest"}
    assert {"202", "422", "4XX", "503"} <= set(operation["responses"])
    for status in ("422", "4XX", "503"):
        assert list(operation["responses"][status]["content"]) == ["application/problem+json"]
    fields = document["components"]["schemas"]["QualityRequest"]["properties"]
    assert {"held_out", "held_out_from", "train_sample", "subsets", "fraction", "seeds", "seed", "retrain",
            "configurations"} <= set(fields)


def test_the_retraining_defaults_are_the_engines():
    from api_schemas.quality import RetrainSettings
    from fastif.quality import RetrainConfig

    settings, engine = RetrainSettings(), RetrainConfig()
    assert {k: getattr(engine, k) for k in settings.model_dump()} == settings.model_dump()
