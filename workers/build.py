"""The build job of a registered model: features, prefix cache and index, then the curvature's spectrum and EK-FAC factors."""

from __future__ import annotations

import time

from fastif import knn
from fastif.artefacts import search_vectors

from .registry import engine_for, forget
from .runner import Items, JobFailed, JobRun


def run_build(run: JobRun, model_id: str) -> Items:
    model = run.ctx.models.get(model_id)
    if model is None:
        raise JobFailed("model-not-found", f"no model {model_id} (it was deleted)")
    forget(model_id)  # a rebuild reloads from disk
    run.progress("loading", 0, 1)
    engine = engine_for(model, run.ctx.settings)
    engine.prepare(on_progress=run.progress)
    # What the index is ("auto" resolved) and its recall of the exact neighbours, for the model record.
    run.progress("index", 0, 1)
    index = knn.index_report(engine.index, search_vectors(engine.features, engine.gradient_keys, engine.index_config.space))
    # Measured once here so that no query pays for them: the spectrum that relative
    # damping refers to, and the factors of the default solver (EK-FAC).
    clock = time.perf_counter()
    run.progress("spectrum", 0, 1)
    spectrum = engine.spectrum("gauss-newton")
    seconds = {"spectrum": time.perf_counter() - clock}
    clock = time.perf_counter()
    factors = engine.factors(on_progress=run.progress)
    seconds["ekfac"] = time.perf_counter() - clock
    curvature = {"spectra": {"gauss-newton": spectrum.to_dict()}, "ekfac_examples": factors.examples,
                 "ekfac_uncovered": factors.uncovered, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    run.ctx.models.set_ready(model_id, engine.fingerprint, engine.num_train, engine.classifier.labels, curvature,
                             index.to_dict(), engine.store.bytes_on_disk())
    return [{"model_id": model_id, "fingerprint": engine.fingerprint, "num_train": engine.num_train,
             "num_params": engine.num_params}]
