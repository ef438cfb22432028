"""Cache keys: every field that changes the numbers misses, every field that does not hits.

``records/keys.py`` is checked string by string; the s_test cache through the engine's own
``cached_s_test`` on the real Redis (``RedisTensorCache``), where each miss is also shown to
change the numbers and each hit is shown, by solving again without the cache, not to; the
result cache through ``workers.influence.result_cache_key`` on real model records.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json

import pytest
import redis
import torch
from safetensors.torch import save as save_tensors

from api_schemas import InfluenceRequest, ModelCreate
from fastif import DataSpec, InfluenceEngine, InfluenceSpec, Query
from records import keys
from records.keys import cache_key
from records.models import ModelStore
from tiny import make_tiny_bert, sentences, write_jsonl
from workers.configs import solver_config
from workers.influence import result_cache_key
from workers import tensor_cache
from workers.tensor_cache import RedisTensorCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- records/keys.py ------------------------------------------------------------------------------------
def test_canonical_json_is_sorted_compact_unicode_and_finite():
    assert keys.canonical_json({"b": 1, "a": [1, {"d": 2, "c": None}], "é": "ü"}) == \
        '{"a":[1,{"c":null,"d":2}],"b":1,"é":"ü"}'
    assert keys.canonical_json({"x": 1.5}) == keys.canonical_json({"x": 1.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            keys.canonical_json({"x": bad})


def test_sha256_is_of_the_canonical_bytes():
    payload = {"text": "naïve", "label": 1, "lissa": {"seed": 3, "depth": 10}}
    expected = hashlib.sha256('{"label":1,"lissa":{"depth":10,"seed":3},"text":"naïve"}'.encode("utf-8")).hexdigest()
    assert keys.sha256_hex(payload) == expected
    assert keys.sha256_hex(dict(reversed(list(payload.items())))) == expected
    assert keys.sha256_hex({**payload, "label": 2}) != expected


def test_every_key_is_spelled_out():
    assert keys.PREFIX == "fastif"
    assert (keys.MODELS, keys.JOBS, keys.JOBS_QUEUED, keys.WORKER_PATTERN) == \
        ("fastif:models", "fastif:jobs", "fastif:jobs:queued", "fastif:worker:*")
    assert keys.model("m1") == "fastif:model:m1" and keys.job("j1") == "fastif:job:j1"
    assert keys.results("j1") == "fastif:results:j1" and keys.idem("k") == "fastif:idem:k"
    # two callers who pick the same Idempotency-Key get their own jobs
    assert keys.idem("k", "alice") == "fastif:idem:alice:k" != keys.idem("k", "bob")
    assert keys.worker("w@h") == "fastif:worker:w@h"
    assert fnmatch.fnmatchcase(keys.worker("w@h"), keys.WORKER_PATTERN)
    payload = {"a": 1}
    assert keys.cache_key("fp", "s_test", payload) == f"fastif:v1:fp:s_test:{keys.sha256_hex(payload)}"
    assert keys.cache_key("fp", "grad", payload) != keys.cache_key("fp", "s_test", payload)
    assert keys.cache_key("fp2", "grad", payload) != keys.cache_key("fp", "grad", payload)


def test_cache_pattern_matches_exactly_one_models_keys_on_redis(redis_client: redis.Redis):
    assert keys.cache_pattern("a*b?c[d]e\\f") == "fastif:v1:a\\*b\\?c\\[d\\]e\\\\f:*"
    assert keys.cache_pattern("plain") == "fastif:v1:plain:*"
    assert keys.cache_pattern("XmodelX") == "fastif:v1:XmodelX:*"  # only the glob characters are escaped
    tricky, other = "m*[x]?\\", "mz[x]a\\"
    for fp in (tricky, other, "m"):
        redis_client.set(keys.cache_key(fp, "grad", {"i": 1}), 1)
        redis_client.set(keys.cache_key(fp, "s_test", {"i": 2}), 1)
    found = set(redis_client.scan_iter(match=keys.cache_pattern(tricky)))
    assert found == {keys.cache_key(tricky, "grad", {"i": 1}), keys.cache_key(tricky, "s_test", {"i": 2})}
    assert len(set(redis_client.scan_iter(match=keys.cache_pattern("m")))) == 2


# -- the s_test cache ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-keys")
    make_tiny_bert(root / "model", seed=3, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(24, seed=4, noise=0.1))
    return root


@pytest.fixture(scope="module")
def engine(files) -> InfluenceEngine:
    engine = InfluenceEngine.from_paths(files / "model", DataSpec(str(files / "train.jsonl")))
    engine.prepare()
    return engine


BASE = {"model_id": "m", "inputs": [{"text": "the film was really good"}], "k": 10, "top": 5}
LISSA = {"depth": 30, "batch_size": 2, "repeats": 1, "seed": 2}


def request(**fields) -> InfluenceRequest:
    body = {**BASE, **fields}
    return InfluenceRequest.model_validate(body)


def solve(engine, req: InfluenceRequest, cache=None):
    queries = [Query(i.text, i.text_pair, i.label) for i in req.inputs]
    plan = engine.plan(queries, req.group, cache)
    s_tests, _, cached, _ = engine.cached_s_test(plan, solver_config(req), cache)
    return s_tests, cached


@pytest.fixture
def cache(redis_url, redis_client, engine):
    return RedisTensorCache(redis.Redis.from_url(redis_url), engine.fingerprint, 3600, 2**30)


# (base request, the same request with one field changed): that field changes s_test, so it must miss
MISSES = {
    "solver lissa -> cg": ({"solver": "lissa", "lissa": LISSA}, {"solver": "cg", "lissa": LISSA}),
    "solver cg -> identity": ({"solver": "cg"}, {"solver": "identity"}),
    "solver ekfac -> kfac": ({"solver": "ekfac"}, {"solver": "kfac"}),
    "solver identity -> ekfac": ({"solver": "identity", "damping": 0.5}, {"solver": "ekfac", "damping": 0.5}),
    # (this random model's Hessian has a negative mean eigenvalue: an absolute λ above its spectrum)
    "curvature (cg)": ({"solver": "cg", "damping": 20.0}, {"solver": "cg", "curvature": "hessian", "damping": 20.0}),
    "curvature (lissa)": ({"solver": "lissa", "damping": 20.0, "lissa": LISSA},
                          {"solver": "lissa", "curvature": "hessian", "damping": 20.0, "lissa": LISSA}),
    "damping": ({"solver": "cg", "damping": 0.5}, {"solver": "cg", "damping": 0.7}),
    "damping given vs relative": ({"solver": "identity"}, {"solver": "identity", "damping": 0.5}),
    "damping_ratio": ({"solver": "cg", "damping_ratio": 0.1}, {"solver": "cg", "damping_ratio": 0.3}),
    "damping_ratio (ekfac blocks)": ({"solver": "ekfac", "damping_ratio": 10.0}, {"solver": "ekfac", "damping_ratio": 3.0}),
    "damping_scope": ({"solver": "ekfac", "damping_ratio": 1.0, "damping_scope": "block"},
                      {"solver": "ekfac", "damping_ratio": 1.0, "damping_scope": "curvature"}),
    "lissa.depth": ({"solver": "lissa", "lissa": LISSA}, {"solver": "lissa", "lissa": {**LISSA, "depth": 31}}),
    "lissa.batch_size": ({"solver": "lissa", "lissa": LISSA}, {"solver": "lissa", "lissa": {**LISSA, "batch_size": 3}}),
    "lissa.repeats": ({"solver": "lissa", "lissa": LISSA}, {"solver": "lissa", "lissa": {**LISSA, "repeats": 2}}),
    "lissa.seed": ({"solver": "lissa", "lissa": LISSA}, {"solver": "lissa", "lissa": {**LISSA, "seed": 3}}),
    "lissa.damp": ({"lissa": {**LISSA, "damp": 0.01, "scale": 100.0}}, {"lissa": {**LISSA, "damp": 0.02, "scale": 100.0}}),
    "lissa.scale": ({"lissa": {**LISSA, "damp": 0.01, "scale": 100.0}}, {"lissa": {**LISSA, "damp": 0.01, "scale": 200.0}}),
    "lissa absolute vs derived": ({"solver": "lissa", "lissa": LISSA},
                                  {"solver": "lissa", "curvature": "gauss-newton",
                                   "lissa": {**LISSA, "damp": 0.001, "scale": 100.0}}),
    "cg.tol": ({"solver": "cg", "cg": {"tol": 0.5, "max_iter": 50}}, {"solver": "cg", "cg": {"tol": 1e-6, "max_iter": 50}}),
    "cg.max_iter": ({"solver": "cg", "cg": {"tol": 1e-9, "max_iter": 1}}, {"solver": "cg", "cg": {"tol": 1e-9, "max_iter": 2}}),
    "input text": ({"solver": "ekfac"}, {"solver": "ekfac", "inputs": [{"text": "awful boring plot"}]}),
    "input label": ({"solver": "ekfac", "inputs": [{"text": "the film was really good", "label": 0}]},
                    {"solver": "ekfac", "inputs": [{"text": "the film was really good", "label": 1}]}),
    "input text_pair": ({"solver": "ekfac"}, {"solver": "ekfac", "inputs": [{"text": "the film was really good",
                                                                             "text_pair": "it was fun"}]}),
    "group": ({"solver": "ekfac", "inputs": [{"text": "good fun"}, {"text": "awful plot"}]},
              {"solver": "ekfac", "inputs": [{"text": "good fun"}, {"text": "awful plot"}], "group": True}),
}

# (base, the same request with fields that do not change s_test changed): it must hit, with the same numbers
HITS = {
    "k and top": ({"solver": "ekfac"}, {"solver": "ekfac", "k": None, "top": 3}),
    "model_id": ({"solver": "cg"}, {"solver": "cg", "model_id": "another-registration"}),
    "lissa fields for cg": ({"solver": "cg"}, {"solver": "cg", "lissa": {"depth": 7, "seed": 9, "repeats": 2}}),
    "lissa fields for ekfac": ({"solver": "ekfac"}, {"solver": "ekfac", "lissa": {"depth": 7, "seed": 9}}),
    "cg fields for lissa": ({"solver": "lissa", "lissa": LISSA}, {"solver": "lissa", "lissa": LISSA,
                                                                  "cg": {"tol": 0.1, "max_iter": 3}}),
    "cg fields for identity": ({"solver": "identity"}, {"solver": "identity", "cg": {"tol": 0.1, "max_iter": 3}}),
    "damping_ratio beside an absolute damping": ({"solver": "cg", "damping": 0.5},
                                                 {"solver": "cg", "damping": 0.5, "damping_ratio": 7.0}),
    "the predicted label given explicitly": ({"solver": "ekfac"}, "predicted"),
    "defaults spelled out": ({"solver": "ekfac"}, {"solver": "ekfac", "curvature": "gauss-newton", "damping_scope": "block",
                                                   "damping_ratio": 10.0}),
}


@pytest.mark.parametrize("name", list(MISSES))
def test_a_field_that_changes_s_test_misses_the_cache(engine, cache, name):
    base, changed = MISSES[name]
    first, cached = solve(engine, request(**base), cache)
    assert cached == [False] * len(cached)
    again, cached = solve(engine, request(**base), cache)
    assert all(cached) and torch.equal(again, first)
    fresh, cached = solve(engine, request(**changed), cache)
    assert not any(cached), f"{name}: served the base request's s_test"
    if request(**changed).group == request(**base).group:
        assert not torch.allclose(fresh, first, rtol=1e-4, atol=0.0), f"{name} does not change s_test: the test is void"


@pytest.mark.parametrize("name", list(HITS))
def test_a_field_that_does_not_change_s_test_hits_the_cache(engine, cache, name):
    base, changed = HITS[name]
    if changed == "predicted":
        encoded = engine.encode([Query(BASE["inputs"][0]["text"])])
        changed = {**base, "inputs": [{"text": BASE["inputs"][0]["text"], "label": encoded.labels_used[0]}]}
    first, _ = solve(engine, request(**base), cache)
    served, cached = solve(engine, request(**changed), cache)
    assert all(cached), f"{name}: missed the cache"
    assert torch.equal(served, first)
    uncached, _ = solve(engine, request(**changed), None)
    torch.testing.assert_close(uncached, first, rtol=1e-5, atol=1e-8)


def test_another_models_fingerprint_never_reads_this_ones_entries(files, engine, cache, redis_url):
    first, _ = solve(engine, request(solver="cg"), cache)
    same = InfluenceEngine.from_paths(files / "model", DataSpec(str(files / "train.jsonl")))
    same.prepare()
    assert same.fingerprint == engine.fingerprint  # the same model registered twice shares its cache
    _, cached = solve(same, request(solver="cg"), RedisTensorCache(redis.Redis.from_url(redis_url), same.fingerprint, 60, 2**30))
    assert all(cached)
    decayed = InfluenceEngine.from_paths(files / "model", DataSpec(str(files / "train.jsonl")),
                                         InfluenceSpec(weight_decay=0.01))
    decayed.prepare()
    assert decayed.fingerprint != engine.fingerprint
    other_cache = RedisTensorCache(redis.Redis.from_url(redis_url), decayed.fingerprint, 60, 2**30)
    s_test, cached = solve(decayed, request(solver="cg"), other_cache)
    assert not any(cached) and not torch.allclose(s_test, first)
    write_jsonl(files / "train2.jsonl", sentences(24, seed=5, noise=0.1))
    other_data = InfluenceEngine.from_paths(files / "model", DataSpec(str(files / "train2.jsonl")))
    assert other_data.fingerprint not in (engine.fingerprint, decayed.fingerprint)


def test_gradients_are_cached_per_input_and_label(engine, cache):
    query = Query("the film was really good")
    plan = engine.plan([query], cache=cache)
    stored = cache.get("grad", {"text": query.text, "text_pair": None, "label": plan.encoded.labels_used[0]})
    torch.testing.assert_close(stored, plan.vectors[0])
    relabelled = engine.plan([Query(query.text, label=1 - plan.encoded.labels_used[0])], cache=cache)
    assert not torch.allclose(relabelled.vectors[0], plan.vectors[0])
    torch.testing.assert_close(engine.plan([query], cache=cache).vectors, engine.plan([query]).vectors)


# -- the result cache ---------------------------------------------------------------------------------------
def model_record(store: ModelStore, fingerprint: str, **index):
    record = store.create(ModelCreate(name="m", model_path="model", train_data={"path": "train.jsonl"}, index=index))
    store.set_ready(record.id, fingerprint, 24, ["negative", "positive"])
    return store.get(record.id)


RESULT_MISSES = {
    "k": {"k": 11}, "k null": {"k": None}, "top": {"top": 6}, "solver": {"solver": "cg"},
    "curvature": {"solver": "cg", "curvature": "hessian"}, "damping": {"damping": 0.5},
    "damping_ratio": {"damping_ratio": 3.0}, "damping_scope": {"damping_scope": "curvature"},
    "lissa.depth": {"solver": "lissa", "lissa": {"depth": 5}}, "lissa.seed": {"solver": "lissa", "lissa": {"seed": 5}},
    "lissa.batch_size": {"solver": "lissa", "lissa": {"batch_size": 5}},
    "lissa.repeats": {"solver": "lissa", "lissa": {"repeats": 2}},
    "lissa damp and scale": {"lissa": {"damp": 0.01, "scale": 10.0}},
    "cg.tol": {"solver": "cg", "cg": {"tol": 0.01}}, "cg.max_iter": {"solver": "cg", "cg": {"max_iter": 9}},
    "parallel": {"solver": "lissa", "parallel": 2}, "group": {"group": True},
    "inputs": {"inputs": [{"text": "awful"}]}, "label": {"inputs": [{"text": "the film was really good", "label": 1}]},
}


def test_every_field_of_the_request_and_the_index_changes_the_result_key(redis_client):
    store = ModelStore(redis_client)
    model = model_record(store, "fp-1")
    base = result_cache_key(model, request())
    assert base.startswith("fastif:v1:fp-1:result:")
    for name, fields in RESULT_MISSES.items():
        if name.startswith("lissa") or name in ("parallel",):
            reference = result_cache_key(model, request(solver="lissa"))
            assert result_cache_key(model, request(**fields)) != reference or name == "lissa damp and scale", name
        assert result_cache_key(model, request(**fields)) != base, name
    # the same model registered again (same fingerprint, same index): the same key, whatever its id
    twin = model_record(store, "fp-1")
    assert twin.id != model.id and result_cache_key(twin, request(model_id=twin.id)) == base
    assert result_cache_key(model, request(model_id="x")) == base
    assert result_cache_key(model, request(output_path="results/a.jsonl")) == base  # where they are written
    # another index picks other candidates; another fingerprint is another model
    assert result_cache_key(model_record(store, "fp-1", space="feature"), request()) != base
    assert result_cache_key(model_record(store, "fp-1", kind="hnsw"), request()) != base
    assert result_cache_key(model_record(store, "fp-1", prefix_dtype="float16"), request()) != base  # rounded activations
    # Shards batch their own rows: another shard size rounds the build's numbers otherwise.
    assert result_cache_key(model_record(store, "fp-1", shard_examples=512), request()) != base
    assert result_cache_key(model_record(store, "fp-2"), request()) != base
    assert result_cache_key(model, request(), kind="explain") != base
    payload = {**request().model_dump(mode="json", exclude={"model_id", "output_path"}),
               "index": model.request.index.model_dump(mode="json")}
    assert base == keys.cache_key("fp-1", "result", payload)
    assert json.loads(keys.canonical_json(payload))["index"] == {"kind": "auto", "space": "gradient", "prefix": "cached",
                                                                  "prefix_dtype": "float32", "shard_examples": 1024}


def test_the_cache_keeps_within_its_byte_budget_evicting_the_least_recently_used(redis_url, redis_client):
    client = redis.Redis.from_url(redis_url)
    entry = torch.arange(1000, dtype=torch.float32)
    size = len(save_tensors({"tensor": entry}))
    cache = RedisTensorCache(client, "fp", 3600, max_bytes=3 * size)
    for i in range(3):
        cache.put("grad", {"i": i}, entry + i)
    assert cache.get("grad", {"i": 0}) is not None  # used: now the most recent
    cache.put("grad", {"i": 3}, entry + 3)  # a fourth: the least recently used (1) goes
    kept = {i for i in range(4) if cache.get("grad", {"i": i}) is not None}
    assert kept == {0, 2, 3}
    torch.testing.assert_close(cache.get("grad", {"i": 3}), entry + 3)
    entries = [key for key in client.scan_iter("fastif:v1:fp:*")]
    assert int(client.get(tensor_cache.INDEX + ":bytes")) == sum(client.strlen(key) for key in entries) == 3 * size
    cache.put("grad", {"i": 3}, entry + 3)  # written again: counted once
    assert int(client.get(tensor_cache.INDEX + ":bytes")) == 3 * size
    client.delete(cache_key("fp", "grad", {"i": 0}))  # gone some other way (its TTL): evicted at no cost
    cache.put("grad", {"i": 4}, entry + 4)
    assert {i for i in range(5) if cache.get("grad", {"i": i}) is not None} == {2, 3, 4}
    RedisTensorCache(client, "fp", 3600, max_bytes=size - 1).put("grad", {"i": 5}, entry)  # larger than the budget
    assert cache.get("grad", {"i": 5}) is None and int(client.get(tensor_cache.INDEX + ":bytes")) == 3 * size
