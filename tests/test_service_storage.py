"""Registration refuses, before recording anything, a build the state volume cannot hold (507)."""

from __future__ import annotations

import json
import math
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api_schemas import ModelCreate
from records.settings import settings_from
from service.app import create_app
from service.storage import build_size

ROWS = [{"text": "a film of great warmth and wit " * (i % 5 + 1), "label": "positive"} for i in range(300)]


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "models" / "m").mkdir(parents=True)
    (root / "models" / "m" / "config.json").write_text(json.dumps(
        {"hidden_size": 384, "id2label": {"0": "negative", "1": "positive", "2": "neutral"}}))
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return root


def body(**index) -> dict:
    return {"name": "m", "model_path": "models/m", "train_data": {"path": "train.jsonl"},
            "influence": {"max_length": 32}, "index": index}


def test_the_estimate_bounds_what_the_build_writes(data_root):
    size = build_size(data_root, ModelCreate.model_validate(body()))
    data_bytes = (data_root / "train.jsonl").stat().st_size
    examples = len(ROWS) + 1  # a last line counts: an upper bound
    assert size.examples == examples
    assert size.tokens == min(examples * 32, data_bytes // 3 + 2 * examples)
    per_example = 384 * 4 + 2 * (2 * 384 * 4) + 16  # feature, key and the index's copy of it with its id, prefix offset
    sample = min(examples, 256 * math.isqrt(examples)) * 2 * 384 * 4  # an IVF's training sample, in a scratch file
    # The stored training set: texts (at most the file), ids and segment ids, offsets and labels.
    stored_set = data_bytes + 8 * size.tokens + 48 * examples
    assert size.bytes == examples * per_example + sample + size.tokens * 384 * 4 + stored_set
    half = build_size(data_root, ModelCreate.model_validate(body(prefix_dtype="bfloat16")))
    none = build_size(data_root, ModelCreate.model_validate(body(prefix="recompute")))
    assert half.bytes == examples * per_example + sample + size.tokens * 384 * 2 + stored_set
    assert none.bytes == examples * per_example + sample + stored_set


def test_a_build_the_volume_cannot_hold_is_refused_and_nothing_is_recorded(data_root, redis_client, redis_url,
                                                                           monkeypatch):
    needed = build_size(data_root, ModelCreate.model_validate(body())).bytes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 10 * needed - needed // 2, needed // 2))
    settings = settings_from(redis_url=redis_url, data_root=data_root)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/models", json=body())
        assert response.status_code == 507
        problem = response.json()
        assert problem["type"].endswith("/insufficient-storage") and "recompute" in problem["detail"]
        assert client.get("/v1/models").json()["items"] == []  # no model, no build job
        assert client.get("/v1/jobs").json()["items"] == []
        # Half the activations' bytes still do not fit; keeping none does.
        assert client.post("/v1/models", json=body(prefix_dtype="float16")).status_code == 507
        assert client.post("/v1/models", json=body(prefix="recompute")).status_code == 202
