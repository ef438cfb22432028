"""Model records in Redis: a registered model, its build state and its cache keys."""

from __future__ import annotations

import json
import time
import uuid

import redis

from api_schemas import ErrorInfo, Model, ModelCreate

from . import _scripts, keys
from ._codec import optional_int, text, text_dict, timestamp
from ._hash_store import HashRecordStore
from .errors import ModelNotFound

_DELETE_BATCH = 500


class ModelStore(HashRecordStore[Model]):
    """Create, advance, read and delete model records (`fastif:model:{id}`).

    get(model_id) and require(model_id) (ModelNotFound) come from HashRecordStore.
    """

    def __init__(self, client: redis.Redis) -> None:
        """Bind to a redis client."""
        super().__init__(client, keys.model, _to_model, ModelNotFound)
        self._hset = client.register_script(_scripts.HSET_EXISTING)

    def create(self, request: ModelCreate) -> Model:
        """Record a new model in status `building`."""
        model_id = uuid.uuid4().hex
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.model(model_id), mapping={
            "id": model_id, "name": request.name, "status": "building", "created_at": repr(now),
            "request": keys.canonical_json(request.model_dump(mode="json")),
        })
        pipe.zadd(keys.MODELS, {model_id: now})
        pipe.execute()
        model = self.get(model_id)
        assert model is not None
        return model

    def set_build_job(self, model_id: str, job_id: str) -> bool:
        """Remember which job builds the model; False if the model is gone."""
        return self._update(model_id, {"build_job_id": job_id})

    def set_ready(self, model_id: str, fingerprint: str, num_train: int, labels: list[str],
                  curvature: dict | None = None, index: dict | None = None, bytes_on_disk: int | None = None) -> bool:
        """The build finished: the model can be queried; False if the model is gone.

        ``curvature``: what the build measured of the curvature (spectrum, EK-FAC fit), shown on the record;
        ``index``: the kNN index it built and its measured recall (fastif.knn.IndexReport); ``bytes_on_disk``:
        what its artefacts take on the state volume.
        """
        return self._update(model_id, {
            "status": "ready", "ready_at": repr(time.time()), "fingerprint": fingerprint,
            "num_train": int(num_train), "examples_encoded": int(num_train), "labels": json.dumps(list(labels)),
            "curvature": json.dumps(curvature or {}), "index": json.dumps(index) if index else "",
            "bytes_on_disk": "" if bytes_on_disk is None else str(int(bytes_on_disk)),
            "error_code": "", "error_message": "",
        })

    def set_examples_encoded(self, model_id: str, done: int) -> bool:
        """How many training examples the build has written so far; False if the model is gone."""
        return self._update(model_id, {"examples_encoded": int(done)})

    def set_quality(self, model_id: str, report: dict) -> bool:
        """The latest quality report of the model (POST /v1/models/{id}/quality); False if the model is gone."""
        return self._update(model_id, {"quality": json.dumps(report)})

    def set_failed(self, model_id: str, code: str, message: str) -> bool:
        """The build failed with error {code, message}; False if the model is gone."""
        return self._update(model_id, {"status": "failed", "error_code": code, "error_message": message})

    def list(self, limit: int = 100) -> list[Model]:
        """The newest models first; forgets ids whose record is gone."""
        ids = [text(i) for i in self.redis.zrevrange(keys.MODELS, 0, max(limit, 1) - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for model_id in ids:
            pipe.hgetall(keys.model(model_id))  # type: ignore[arg-type]
        models, gone = [], []
        for model_id, raw in zip(ids, pipe.execute(), strict=True):
            if raw:
                models.append(_to_model(text_dict(raw)))
            else:
                gone.append(model_id)
        if gone:
            self.redis.zrem(keys.MODELS, *gone)
        return models

    def delete(self, model_id: str) -> bool:
        """Forget the model and every cache key of its fingerprint; False if it did not exist."""
        fingerprint = text(self.redis.hget(keys.model(model_id), "fingerprint"))
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.model(model_id))
        pipe.zrem(keys.MODELS, model_id)
        existed, _ = pipe.execute()
        if fingerprint:
            # SCAN, never KEYS: KEYS blocks the server for the whole keyspace.
            batch = []
            for key in self.redis.scan_iter(match=keys.cache_pattern(fingerprint), count=1000):
                batch.append(key)
                if len(batch) >= _DELETE_BATCH:
                    self.redis.unlink(*batch)
                    batch.clear()
            if batch:
                self.redis.unlink(*batch)
        return bool(existed)

    def _update(self, model_id: str, fields: dict[str, object]) -> bool:
        """HSET on an existing model only, so a late worker never resurrects a deleted model."""
        flat = [item for pair in fields.items() for item in pair]
        return bool(self._hset(keys=[keys.model(model_id)], args=flat))


def _to_model(fields: dict[str, str]) -> Model:
    """A model hash -> the Model resource."""
    error = None
    if fields.get("error_code"):
        error = ErrorInfo(code=fields["error_code"], message=fields.get("error_message", ""))
    labels = fields.get("labels")
    return Model(
        id=fields["id"],
        name=fields["name"],
        status=fields["status"],  # type: ignore[arg-type]
        created_at=timestamp(fields["created_at"]),  # type: ignore[arg-type]
        ready_at=timestamp(fields.get("ready_at")),
        error=error,
        request=ModelCreate.model_validate_json(fields["request"]),
        num_train=optional_int(fields.get("num_train")),
        examples_encoded=optional_int(fields.get("examples_encoded")),
        labels=json.loads(labels) if labels else None,
        fingerprint=fields.get("fingerprint") or None,
        build_job_id=fields.get("build_job_id") or None,
        curvature=json.loads(fields["curvature"]) if fields.get("curvature") else None,
        index=json.loads(fields["index"]) if fields.get("index") else None,
        bytes_on_disk=int(fields["bytes_on_disk"]) if fields.get("bytes_on_disk") else None,
        quality=json.loads(fields["quality"]) if fields.get("quality") else None,
    )
