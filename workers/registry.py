"""Each worker process loads a model once and keeps it (engine, features, index)."""

from __future__ import annotations

import threading
from pathlib import Path

from api_schemas import Model
from fastif import InfluenceEngine
from records.paths import OutsideRoot, resolve_inside
from records.settings import Settings

from .configs import index_config, influence_spec, train_data_spec
from .runner import JobFailed, JobRun
from .tensor_cache import RedisTensorCache

_engines: dict[str, InfluenceEngine] = {}
_lock = threading.Lock()


def _resolve(settings: Settings, relative: str) -> Path:
    """Records hold paths relative to the data root; refuse anything that escapes it."""
    try:
        return resolve_inside(settings.data_root, relative)
    except OutsideRoot:
        raise ValueError(f"{relative!r} is outside the data root") from None


def artefact_dir(settings: Settings) -> Path:
    return settings.state_root / "artefacts"


def engine_for(model: Model, settings: Settings) -> InfluenceEngine:
    """The loaded engine of ``model``, loading it (and its artefacts) on first use."""
    with _lock:
        engine = _engines.get(model.id)
        if engine is not None:
            return engine
        request = model.request
        engine = InfluenceEngine.from_paths(
            _resolve(settings, request.model_path),
            train_data_spec(_resolve(settings, request.train_data.path), request.train_data),
            influence_spec(request.influence),
            index_config(request.index),
            artefact_dir=artefact_dir(settings),
            compile_hvp=settings.compile_hvp,
        )
        _engines[model.id] = engine
        return engine


def forget(model_id: str) -> None:
    with _lock:
        _engines.pop(model_id, None)


def ready_model(run: JobRun, model_id: str) -> Model:
    """The job's model, which must still be registered and built."""
    model = run.ctx.models.get(model_id)
    if model is None:
        raise JobFailed("model-not-found", f"no model {model_id} (it was deleted)")
    if model.status != "ready":
        raise JobFailed("model-not-ready", f"model {model_id} is {model.status}")
    return model


def engine_and_cache(run: JobRun, model: Model) -> tuple[InfluenceEngine, RedisTensorCache]:
    """The model's prepared engine, and its Redis cache of per-test gradients and s_test."""
    engine = engine_for(model, run.ctx.settings)
    engine.prepare()
    settings = run.ctx.settings
    cache = RedisTensorCache(run.ctx.redis_bytes, model.fingerprint or engine.fingerprint, settings.cache_ttl_s,
                             settings.cache_max_bytes)
    return engine, cache
