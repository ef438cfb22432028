"""The build job of a registered model, in shards over the workers; then the index and the curvature.

The training set is written in contiguous shards (fastif/staged_build.py) that any worker
takes from the queue, as a small state machine on the job's phase (workers/shards.py):

    (none) --build task--> encode --the shard that finds no rows left--> finish-<shard>
        --index built, spectrum task sent--> curvature-<shard>
        --the curvature task that finds the spectrum and the factors saved--> measured-by-<task>

- build (the job's task, ``run_build``): a build already stored is only loaded. Otherwise the
  shards not yet on disk (a build that stopped, or an earlier registration of the same model
  and data, left the others) go out as BUILD_SHARD tasks, and the job is handed on. With at
  most one shard left it is written here, with no message in between. A build task delivered
  again (its worker died) sends the shards still missing again: a shard written twice writes
  the same rows.
- encode (``build_shard``): writes its rows unless they are marked written, then looks at the
  disk: the shard that finds every shard written wins encode -> finish-<its number>.
- finish: the index over the staged vectors; then the curvature is measured by tasks any worker
  takes, each saving its part beside the artefacts. A BUILD_SPECTRUM task (``build_spectrum``)
  estimates the spectrum while the finishing shard fits the bases of EK-FAC's factors (the
  eigenbases: the fit's first pass); then it sends one BUILD_EIGENVALUES task
  (``build_eigenvalues``) per part of the second pass (``EIGENVALUE_PARTS``), which both workers
  share once the spectrum is done. The part that finds every part saved combines the factors;
  the task (spectrum or part) that finds the spectrum and the factors saved moves the phase to
  measured-by-<itself>, makes the model ready and stores the job's result (runner.finish).
  If a worker dies anywhere here, its task's redelivery finds the phase naming it and goes on,
  loading what was saved: the spectrum task is sent before the phase moves past finish-<shard>,
  and the parts after the bases are saved, so a redelivered finisher sends them again rather
  than never (a part done twice saves the same sums).

The job's progress and the model's ``examples_encoded`` count the examples written; the disk
is the truth about which shards are done, so a copy of a shard that runs twice counts once.
"""

from __future__ import annotations

import time

from api_schemas import BuildResult, Model
from fastif import InfluenceEngine, knn
from fastif.artefacts import search_vectors
from fastif.curvature import EIGENVALUE_PARTS
from records.celery_app import BUILD_EIGENVALUES, BUILD_SHARD, BUILD_SPECTRUM
from records.keys import shard_state

from .registry import engine_for, forget
from .runner import HANDED_ON, HandedOn, Items, JobFailed, JobRun, finish
from .shards import advance, phase_of, run_shard

ENCODE = "encode"
CURVATURE = "curvature-"  # + the finishing shard: the spectrum, EK-FAC's bases, then its parts, on any worker
MEASURED = "measured-by-"  # + "spectrum" or "eigenvalues-<part>": the task that found the curvature saved, and finishes


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


def build_shard(job_id: str, model_id: str, shard: int, on_failure, send) -> str:
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
        finisher, measuring = f"finish-{shard}", f"{CURVATURE}{shard}"
        if advance(run.ctx, job_id, ENCODE, finisher) or phase_of(run.ctx, job_id) == finisher:
            engine.finish_build()
            send(BUILD_SPECTRUM, [job_id, model_id])
            advance(run.ctx, job_id, finisher, measuring)
        if phase_of(run.ctx, job_id) == measuring:
            engine.prepare()  # a redelivery on another worker loads what the finisher moved into place
            _timed(run, "ekfac-bases", lambda: engine.fit_factor_bases(on_progress=run.progress))
            for part in range(EIGENVALUE_PARTS):
                send(BUILD_EIGENVALUES, [job_id, model_id, part])

    return run_shard(job_id, shard, "build", work, on_failure)


def build_spectrum(job_id: str, model_id: str, on_failure) -> str:
    """The spectrum task of a build job, sent by its finishing shard once the artefacts are in place."""

    def work(run: JobRun) -> None:
        engine = engine_for(_model(run, model_id), run.ctx.settings)
        engine.prepare()  # loads what the finisher moved into place
        run.progress("spectrum", 0, 1)
        _timed(run, "spectrum", lambda: engine.spectrum("gauss-newton"))
        _finish_when_measured(run, model_id, engine, "spectrum")

    return run_shard(job_id, 0, "spectrum", work, on_failure)


def build_eigenvalues(job_id: str, model_id: str, part: int, on_failure) -> str:
    """One part of the second pass of a build's EK-FAC fit, sent by its finishing shard once the bases are saved."""

    def work(run: JobRun) -> None:
        engine = engine_for(_model(run, model_id), run.ctx.settings)
        engine.prepare()
        _timed(run, f"ekfac-eigenvalues-{part}", lambda: engine.fit_eigenvalue_part(part, on_progress=run.progress))
        engine.combine_factors()
        _finish_when_measured(run, model_id, engine, f"eigenvalues-{part}")

    return run_shard(job_id, part, "eigenvalues", work, on_failure)


def _finish_when_measured(run: JobRun, model_id: str, engine: InfluenceEngine, me: str) -> None:
    """Of the curvature's tasks, the one that finds the spectrum and the factors saved finishes the build (again,
    when redelivered).

    Each saves its part before it looks, so the last to look sees all; the compare-and-set lets one of
    them through if several do.
    """
    phase = phase_of(run.ctx, run.job_id) or ""
    if phase == MEASURED + me or (phase.startswith(CURVATURE) and engine.curvature_stored()
                                  and advance(run.ctx, run.job_id, phase, MEASURED + me)):
        finish(run, _finish(run, model_id, engine), BuildResult)


def _timed(run: JobRun, part: str, measure):
    """``measure()``, its seconds kept for the model record; the first measurement's (a copy that loads it is not)."""
    clock = time.perf_counter()
    value = measure()
    run.ctx.redis.set(shard_state(run.job_id, "seconds", part), round(time.perf_counter() - clock, 2),
                      ex=run.ctx.settings.result_ttl_s, nx=True)
    return value


def _seconds_of(run: JobRun, *parts: str) -> float:
    """The seconds ``_timed`` kept of these parts of the build, added up (0 for none)."""
    return sum(float(run.ctx.redis.get(shard_state(run.job_id, "seconds", part)) or 0.0) for part in parts)


def _model(run: JobRun, model_id: str) -> Model:
    model = run.ctx.models.get(model_id)
    if model is None:
        raise JobFailed("model-not-found", f"no model {model_id} (it was deleted)")
    return model


def _report_examples(run: JobRun, model_id: str, engine: InfluenceEngine, done: int) -> None:
    run.ctx.jobs.set_progress(run.job_id, "features", done, engine.num_train)
    run.ctx.models.set_examples_encoded(model_id, done)


def _finish(run: JobRun, model_id: str, engine: InfluenceEngine) -> Items:
    """Every example written and the index built: the curvature measured (here, unless the shards' tasks did), and
    the model is ready."""
    # What the index is ("auto" resolved) and its recall of the exact neighbours, for the model record.
    run.progress("index", 0, 1)
    index = knn.index_report(engine.index, search_vectors(engine.features, engine.gradient_keys, engine.index_config.space))
    # Measured once at the build so that no query pays for them: the spectrum that relative
    # damping refers to, and the factors of the default solver (EK-FAC).
    spectrum = _timed(run, "spectrum", lambda: engine.spectrum("gauss-newton"))
    factors = _timed(run, "ekfac", lambda: engine.factors(on_progress=run.progress))
    seconds = {"spectrum": _seconds_of(run, "spectrum"),
               # EK-FAC's: its steps' on the workers where they ran there, else its one fit here.
               "ekfac": _seconds_of(run, "ekfac-bases", *(f"ekfac-eigenvalues-{p}" for p in range(EIGENVALUE_PARTS)))
               or _seconds_of(run, "ekfac")}
    curvature = {"spectra": {"gauss-newton": spectrum.to_dict()}, "ekfac_examples": factors.examples,
                 "ekfac_uncovered": factors.uncovered, "seconds": seconds}
    run.ctx.models.set_ready(model_id, engine.fingerprint, engine.num_train, engine.classifier.labels, curvature,
                             index.to_dict(), engine.bytes_on_disk())
    return [{"model_id": model_id, "fingerprint": engine.fingerprint, "num_train": engine.num_train,
             "num_params": engine.num_params}]
