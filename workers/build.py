"""The build job of a registered model, in shards over the workers; then the index and the curvature.

The training set is written in contiguous shards (fastif/staged_build.py) that any worker
takes from the queue, as a small state machine on the job's phase (workers/shards.py):

    (none) --build task--> encode --the shard that finds no rows left--> finish-<shard>

- build (the job's task, ``run_build``): a build already stored is only loaded. Otherwise the
  shards not yet on disk (a build that stopped, or an earlier registration of the same model
  and data, left the others) go out as BUILD_SHARD tasks, and the job is handed on. With at
  most one shard left it is written here, with no message in between. A build task delivered
  again (its worker died) sends the shards still missing again: a shard written twice writes
  the same rows.
- encode (``build_shard``): writes its rows unless they are marked written, then looks at the
  disk: the shard that finds every shard written wins encode -> finish-<its number>.
- finish: the index over the staged vectors, the curvature's spectrum and EK-FAC factors, the
  model ready and the job's result stored (runner.finish). If its worker dies here, the same
  shard's redelivery finds the phase naming it and finishes.

The job's progress and the model's ``examples_encoded`` count the examples written; the disk
is the truth about which shards are done, so a copy of a shard that runs twice counts once.
"""

from __future__ import annotations

import time

from api_schemas import BuildResult, Model
from fastif import InfluenceEngine, knn
from fastif.artefacts import search_vectors
from records.celery_app import BUILD_SHARD

from .registry import engine_for, forget
from .runner import HANDED_ON, HandedOn, Items, JobFailed, JobRun, finish
from .shards import advance, phase_of, run_shard

ENCODE = "encode"


def run_build(run: JobRun, model_id: str, send) -> Items | HandedOn:
    """The build job's own task: load, or hand the missing shards to the workers, or build what little is left."""
    model = _model(run, model_id)
    forget(model_id)  # a rebuild reloads from disk
    run.progress("loading", 0, 1)
    engine = engine_for(model, run.ctx.settings)
    phase = phase_of(run.ctx, run.job_id)
    if phase is None and not engine.built():
        build = engine.staged_build()
        pending = build.pending()
        _report_examples(run, model_id, engine, build.examples_done())
        if len(pending) > 1 and advance(run.ctx, run.job_id, None, ENCODE):
            run.ctx.jobs.hset(run.job_id, {"shards": len(build.shards)})
            for shard in pending:
                send(BUILD_SHARD, [run.job_id, model_id, shard])
            return HANDED_ON
    elif phase == ENCODE:  # delivered again while its shards run: the missing ones are sent again
        for shard in engine.staged_build().pending():
            send(BUILD_SHARD, [run.job_id, model_id, shard])
        return HANDED_ON
    elif phase is not None:
        return HANDED_ON  # delivered again after a shard took over the finish
    engine.prepare(on_progress=run.progress)
    return _finish(run, model_id, engine)


def build_shard(job_id: str, model_id: str, shard: int, on_failure) -> str:
    """One shard task of a build job (``on_failure``: the model fails with the job)."""

    def work(run: JobRun) -> None:
        model = _model(run, model_id)
        engine = engine_for(model, run.ctx.settings)
        if not engine.built():  # else the finisher moved every shard into place: a late copy has nothing to write
            build = engine.staged_build()
            if not build.done(shard):
                engine.encode_shard(shard, run.progress.cancel_check)
            if build.pending():
                _report_examples(run, model_id, engine, build.examples_done())
                return
        finisher = f"finish-{shard}"
        if advance(run.ctx, job_id, ENCODE, finisher) or phase_of(run.ctx, job_id) == finisher:
            engine.finish_build()
            finish(run, _finish(run, model_id, engine), BuildResult)

    return run_shard(job_id, shard, "build", work, on_failure)


def _model(run: JobRun, model_id: str) -> Model:
    model = run.ctx.models.get(model_id)
    if model is None:
        raise JobFailed("model-not-found", f"no model {model_id} (it was deleted)")
    return model


def _report_examples(run: JobRun, model_id: str, engine: InfluenceEngine, done: int) -> None:
    run.ctx.jobs.set_progress(run.job_id, "features", done, engine.num_train)
    run.ctx.models.set_examples_encoded(model_id, done)


def _finish(run: JobRun, model_id: str, engine: InfluenceEngine) -> Items:
    """Every example written and the index built: measure the curvature, and the model is ready."""
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
