"""Each worker process loads a model once and keeps it (engine, features, index)."""

from __future__ import annotations

import threading
from pathlib import Path

from api_schemas import Model
from fastif import DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec
from records.paths import OutsideRoot, resolve_inside
from records.settings import Settings

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
        data = request.train_data
        params = request.influence.params
        engine = InfluenceEngine.from_paths(
            _resolve(settings, request.model_path),
            DataSpec(path=str(_resolve(settings, data.path)), text_field=data.text_field,
                     text_pair_field=data.text_pair_field, label_field=data.label_field,
                     format=data.format, quoting=data.quoting),
            InfluenceSpec(params="auto" if params == "auto" else tuple(params),
                          weight_decay=request.influence.weight_decay, max_length=request.influence.max_length),
            IndexConfig(kind=request.index.kind, space=request.index.space),
            artefact_dir=artefact_dir(settings),
            compile_hvp=settings.compile_hvp,
        )
        _engines[model.id] = engine
        return engine


def forget(model_id: str) -> None:
    with _lock:
        _engines.pop(model_id, None)
