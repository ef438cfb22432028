"""The build job of a registered model: load it, compute features and prefix cache, build the index."""

from __future__ import annotations

from .registry import engine_for, forget
from .runner import JobFailed, JobRun


def run_build(run: JobRun, model_id: str) -> list[dict]:
    model = run.ctx.models.get(model_id)
    if model is None:
        raise JobFailed("model-not-found", f"no model {model_id} (it was deleted)")
    forget(model_id)  # a rebuild reloads from disk
    run.progress("loading", 0, 1)
    engine = engine_for(model, run.ctx.settings)
    engine.prepare(on_progress=run.progress)
    run.ctx.models.set_ready(model_id, engine.fingerprint, engine.num_train, engine.classifier.labels)
    return [{"model_id": model_id, "fingerprint": engine.fingerprint, "num_train": engine.num_train,
             "num_params": engine.num_params}]
