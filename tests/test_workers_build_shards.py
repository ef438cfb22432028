"""The sharded build job (workers/build.py) run task by task in this process, on the real Redis.

The messages the tasks send are kept by the test and delivered in the order it picks: shards in
any order, a shard twice, a build task delivered again, the spectrum task before or after the
parts of EK-FAC's fit, a part twice, a finisher, spectrum or part task whose worker died. Over
real worker processes: tests/test_integration_build_shards.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from api_schemas import ModelCreate
from fastif import DataSpec, IndexConfig, InfluenceEngine, InfluenceSpec, knn
from fastif.curvature import EIGENVALUE_PARTS, FactorFit
from records.celery_app import BUILD_EIGENVALUES, BUILD_SHARD, BUILD_SPECTRUM
from records.settings import settings_from
from tiny import assert_same_build, assert_same_curvature, make_tiny_bert, sentences, write_jsonl
from workers import build, registry, runner, shards
from workers.context import WorkerContext
from workers.results import ITEM_MODELS
from workers.runner import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARD = 16  # 60 examples: shards 0-16, 16-32, 32-48, 48-60


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build-shards-root")
    make_tiny_bert(root / "model", seed=1, initializer_range=0.3)
    write_jsonl(root / "train.jsonl", sentences(60, seed=2, noise=0.1))
    return root


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> InfluenceEngine:
    """One process, one prepare()."""
    engine = InfluenceEngine.from_paths(data_root / "model", DataSpec(str(data_root / "train.jsonl")), InfluenceSpec(),
                                        IndexConfig(shard_examples=SHARD), artefact_dir=tmp_path_factory.mktemp("ref"))
    engine.prepare()
    return engine


@pytest.fixture
def ctx(redis_client, redis_url, data_root, tmp_path, monkeypatch) -> WorkerContext:
    settings = settings_from(redis_url=redis_url, data_root=data_root, state_dir=tmp_path / "state")
    context = WorkerContext(settings)
    for module in (shards, runner):
        monkeypatch.setattr(module, "context", lambda: context)
    monkeypatch.setattr(registry, "_engines", {})  # each test's workers load their own engines
    return context


class Transport:
    """What Celery would carry: the shard, spectrum and EK-FAC part messages, delivered when the test says."""

    def __init__(self):
        self.sent: list[list] = []
        self.spectra: list[list] = []
        self.parts: list[int] = []

    def __call__(self, name: str, args: list) -> None:
        assert name in (BUILD_SHARD, BUILD_SPECTRUM, BUILD_EIGENVALUES)
        if name == BUILD_EIGENVALUES:
            self.parts.append(args[2])
        else:
            (self.sent if name == BUILD_SHARD else self.spectra).append(list(args))

    def take_parts(self) -> list[int]:
        taken, self.parts = self.parts, []
        return taken

    def take(self) -> list[int]:
        taken, self.sent = [args[2] for args in self.sent], []
        return taken

    def take_spectra(self) -> int:
        taken, self.spectra = len(self.spectra), []
        return taken


def register(ctx: WorkerContext) -> tuple[str, str]:
    create = ModelCreate(name="tiny", model_path="model", train_data={"path": "train.jsonl"},
                         index={"shard_examples": SHARD})
    model = ctx.models.create(create)
    job = ctx.jobs.create("build_model", model.id, create.model_dump(mode="json"))
    ctx.models.set_build_job(model.id, job.id)
    return model.id, job.id


def build_task(ctx, model_id, job_id, transport) -> str:
    return run_job(job_id, lambda run: build.run_build(run, model_id, transport), ITEM_MODELS["build_model"])


def shard_task(ctx, model_id, job_id, shard, transport=None) -> str:
    return build.build_shard(job_id, model_id, shard, on_failure=lambda code, message: ctx.models.set_failed(model_id, code, message),
                             send=transport if transport is not None else Transport())


def spectrum_task(ctx, model_id, job_id) -> str:
    return build.build_spectrum(job_id, model_id, on_failure=lambda code, message: ctx.models.set_failed(model_id, code, message))


def part_task(ctx, model_id, job_id, part) -> str:
    return build.build_eigenvalues(job_id, model_id, part,
                                   on_failure=lambda code, message: ctx.models.set_failed(model_id, code, message))


def measure(ctx, model_id, job_id, transport) -> None:
    """The curvature's tasks after the finisher's: the spectrum, then the parts it sent; the model is ready."""
    assert spectrum_task(ctx, model_id, job_id) == "done"
    assert [part_task(ctx, model_id, job_id, part) for part in transport.take_parts()] == ["done"] * EIGENVALUE_PARTS
    assert ctx.models.get(model_id).status == "ready"


def fit_steps(ctx, fingerprint) -> list[str]:
    """EK-FAC's steps on disk (the bases and the parts), which the combined factors replace."""
    return sorted(p.name for p in (ctx.settings.state_root / "artefacts" / fingerprint).glob("ekfac-*"))


def all_shards_but_the_last(ctx) -> tuple[str, str, Transport]:
    """A registration whose shards but the last (3) are written: the next shard task finishes the build."""
    model_id, job_id = register(ctx)
    transport = Transport()
    build_task(ctx, model_id, job_id, transport)
    for shard in transport.take()[:-1]:
        shard_task(ctx, model_id, job_id, shard, transport)
    return model_id, job_id, transport


def dies(why: str):
    """A stand-in for a step whose worker dies there."""

    def worker_dies(*_args, **_kwargs):
        raise SystemExit(why)

    return worker_dies


def the_finisher_dies_in(ctx, owner: object, step: str, why: str) -> tuple[str, str, Transport]:
    """Every shard but the last written, then the last one's task dies in ``owner.step``."""
    model_id, job_id, transport = all_shards_but_the_last(ctx)
    with pytest.MonkeyPatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(owner, step, dies(why))
        shard_task(ctx, model_id, job_id, 3, transport)
    return model_id, job_id, transport


def stored(ctx, model_id) -> InfluenceEngine:
    """The model as a worker that never built it loads it."""
    model = ctx.models.get(model_id)
    engine = InfluenceEngine.from_paths(ctx.settings.data_root / "model", DataSpec(str(ctx.settings.data_root / "train.jsonl")),
                                        InfluenceSpec(), IndexConfig(shard_examples=SHARD),
                                        artefact_dir=ctx.settings.state_root / "artefacts")
    assert engine.fingerprint == model.fingerprint and engine.built()
    engine.prepare()
    return engine


def test_shards_in_any_order_finish_the_build_once(ctx, reference):
    model_id, job_id = register(ctx)
    transport = Transport()
    assert build_task(ctx, model_id, job_id, transport) == "handed-on"
    sent = transport.take()
    assert sent == [0, 1, 2, 3]
    assert ctx.jobs.get(job_id).progress.done == 0 and ctx.models.get(model_id).examples_encoded == 0
    outcomes = [shard_task(ctx, model_id, job_id, shard, transport) for shard in (2, 0, 3, 0)]  # shard 0 twice
    assert outcomes == ["done"] * 4 and ctx.models.get(model_id).status == "building"
    progress = ctx.jobs.get(job_id).progress
    assert (progress.stage, progress.done, progress.total) == ("features", 44, 60)  # 16 + 16 + 12, shard 0 once
    assert transport.take_spectra() == 0 and transport.take_parts() == []
    # The last rows: this shard builds the index, sends the spectrum task, fits EK-FAC's bases and sends its parts.
    assert shard_task(ctx, model_id, job_id, 1, transport) == "done"
    parts = transport.take_parts()
    assert transport.take_spectra() == 1 and parts == list(range(EIGENVALUE_PARTS))
    assert shards.phase_of(ctx, job_id) == "curvature-1" and ctx.models.get(model_id).status == "building"
    assert fit_steps(ctx, reference.fingerprint) == ["ekfac-bases.safetensors"]
    # The parts in any order, one twice, the spectrum between them: the last part finishes.
    first, last = [parts[2], parts[0], parts[2], parts[3]], parts[1]
    assert [part_task(ctx, model_id, job_id, part) for part in first] == ["done"] * 4
    assert spectrum_task(ctx, model_id, job_id) == "done"  # a part is missing: not ready yet
    assert ctx.models.get(model_id).status == "building" and shards.phase_of(ctx, job_id) == "curvature-1"
    assert part_task(ctx, model_id, job_id, last) == "done"
    job, model = ctx.jobs.get(job_id), ctx.models.get(model_id)
    assert job.status == "succeeded" and model.status == "ready" and model.examples_encoded == 60
    assert shards.phase_of(ctx, job_id) == f"measured-by-eigenvalues-{last}"
    assert fit_steps(ctx, model.fingerprint) == []  # combined into ekfac.safetensors
    assert ctx.jobs.results(job_id)[1][0]["num_train"] == 60
    assert all(model.curvature.seconds[part] > 0 for part in ("spectrum", "ekfac"))  # each task's own measurement
    assert shard_task(ctx, model_id, job_id, 1, transport) == "skipped"  # late copies find the job over
    assert spectrum_task(ctx, model_id, job_id) == "skipped" and part_task(ctx, model_id, job_id, last) == "skipped"
    engine = stored(ctx, model_id)
    assert_same_build(engine, reference)
    assert_same_curvature(engine, reference)


def test_a_build_task_delivered_again_sends_only_the_missing_shards(ctx, reference):
    model_id, job_id = register(ctx)
    transport = Transport()
    build_task(ctx, model_id, job_id, transport)
    transport.take()
    shard_task(ctx, model_id, job_id, 1)
    shard_task(ctx, model_id, job_id, 3)
    assert build_task(ctx, model_id, job_id, transport) == "handed-on"  # its worker died; the message came back
    assert transport.take() == [0, 2]
    for shard in (0, 2):
        shard_task(ctx, model_id, job_id, shard, transport)
    measure(ctx, model_id, job_id, transport)
    assert_same_build(stored(ctx, model_id), reference)


def test_a_finisher_that_died_fitting_the_bases_fits_them_again_and_sends_the_parts(ctx, reference):
    model_id, job_id, transport = the_finisher_dies_in(ctx, InfluenceEngine, "fit_factor_bases",
                                                       "the finisher's worker died while fitting EK-FAC's bases")
    assert transport.take_spectra() == 1 and shards.phase_of(ctx, job_id) == "curvature-3"
    assert transport.take_parts() == []
    assert spectrum_task(ctx, model_id, job_id) == "done"  # the factors are missing: not ready yet
    assert ctx.models.get(model_id).status == "building" and shards.phase_of(ctx, job_id) == "curvature-3"
    registry.forget(model_id)  # the finisher's redelivery lands on a fresh worker
    assert shard_task(ctx, model_id, job_id, 3, transport) == "done"
    assert transport.take_spectra() == 0  # the spectrum was sent once, before the phase moved on
    parts = transport.take_parts()
    assert [part_task(ctx, model_id, job_id, part) for part in parts] == ["done"] * EIGENVALUE_PARTS
    assert ctx.models.get(model_id).status == "ready"
    assert shards.phase_of(ctx, job_id) == f"measured-by-eigenvalues-{parts[-1]}"  # the spectrum was done first
    engine = stored(ctx, model_id)
    assert_same_build(engine, reference)
    assert_same_curvature(engine, reference)


def test_a_finisher_that_died_sending_the_parts_sends_them_again_from_the_saved_bases(ctx, reference, monkeypatch):
    model_id, job_id, transport = all_shards_but_the_last(ctx)

    def dies_after_two_parts(name: str, args: list) -> None:
        transport(name, args)
        if len(transport.parts) == 2:
            raise SystemExit("the worker died after sending two of the parts")

    with pytest.raises(SystemExit):
        shard_task(ctx, model_id, job_id, 3, dies_after_two_parts)
    assert transport.take_parts() == [0, 1]
    assert part_task(ctx, model_id, job_id, 1) == "done"  # a part sent before the death runs meanwhile
    registry.forget(model_id)  # the redelivery, on a fresh worker, loads the bases
    monkeypatch.setattr(FactorFit, "bases", lambda *_a, **_k: pytest.fail("the saved bases were fitted again"))
    assert shard_task(ctx, model_id, job_id, 3, transport) == "done"
    assert transport.take_parts() == list(range(EIGENVALUE_PARTS))  # all of them again
    assert spectrum_task(ctx, model_id, job_id) == "done"
    # Part 1's copy loads the sums its first run saved; the last part finishes.
    assert [part_task(ctx, model_id, job_id, part) for part in range(EIGENVALUE_PARTS)] == ["done"] * EIGENVALUE_PARTS
    assert ctx.models.get(model_id).status == "ready"
    assert_same_curvature(stored(ctx, model_id), reference)


def test_a_part_whose_worker_died_is_fitted_again_and_a_done_part_is_not(ctx, reference, monkeypatch):
    model_id, job_id, transport = all_shards_but_the_last(ctx)
    shard_task(ctx, model_id, job_id, 3, transport)
    parts = transport.take_parts()
    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(FactorFit, "eigenvalue_part", dies("the worker died fitting a part"))
        part_task(ctx, model_id, job_id, parts[0])
    assert spectrum_task(ctx, model_id, job_id) == "done"
    for part in parts[1:]:
        assert part_task(ctx, model_id, job_id, part) == "done"
    assert ctx.models.get(model_id).status == "building"
    fitted = []
    original = FactorFit.eigenvalue_part

    def counted(self, bases, part, *args, **kwargs):
        fitted.append(part)
        return original(self, bases, part, *args, **kwargs)

    monkeypatch.setattr(FactorFit, "eigenvalue_part", counted)
    registry.forget(model_id)  # redeliveries land on a fresh worker
    assert part_task(ctx, model_id, job_id, parts[1]) == "done"  # a copy of a saved part: loaded, not fitted
    assert fitted == [] and ctx.models.get(model_id).status == "building"
    assert part_task(ctx, model_id, job_id, parts[0]) == "done"  # the redelivery of the one that died
    assert fitted == [parts[0]]
    assert ctx.models.get(model_id).status == "ready"
    assert shards.phase_of(ctx, job_id) == f"measured-by-eigenvalues-{parts[0]}"
    assert_same_curvature(stored(ctx, model_id), reference)


def test_a_finisher_that_died_building_the_index_builds_it_again(ctx, reference, monkeypatch):
    """The index is written beside the staged vectors: a death there leaves every shard on disk."""
    model_id, job_id, transport = the_finisher_dies_in(ctx, knn, "write_index",
                                                       "the finisher's worker died while it built the index")
    assert shards.phase_of(ctx, job_id) == "finish-3" and transport.take_spectra() == 0
    registry.forget(model_id)  # redelivered to a fresh worker: nothing is encoded again
    monkeypatch.setattr(InfluenceEngine, "encode_shard", lambda *_a, **_k: pytest.fail("a shard was encoded again"))
    assert shard_task(ctx, model_id, job_id, 3, transport) == "done"
    assert transport.take_spectra() == 1
    measure(ctx, model_id, job_id, transport)
    assert_same_build(stored(ctx, model_id), reference)


def test_a_finisher_that_died_before_the_phase_moved_sends_the_spectrum_again(ctx, reference):
    model_id, job_id, transport = all_shards_but_the_last(ctx)

    def dies_after_sending(name: str, args: list) -> None:
        transport(name, args)
        raise SystemExit("the worker died right after sending the spectrum task")

    with pytest.raises(SystemExit):
        shard_task(ctx, model_id, job_id, 3, dies_after_sending)
    assert shards.phase_of(ctx, job_id) == "finish-3"
    assert spectrum_task(ctx, model_id, job_id) == "done"  # its copy runs; the phase does not name a measurement yet
    assert ctx.models.get(model_id).status == "building"
    assert shard_task(ctx, model_id, job_id, 3, transport) == "done"  # redelivered: sends again, fits the bases
    assert transport.take_spectra() == 2
    assert [part_task(ctx, model_id, job_id, part) for part in transport.take_parts()] == ["done"] * EIGENVALUE_PARTS
    assert ctx.models.get(model_id).status == "ready" and ctx.jobs.get(job_id).status == "succeeded"
    assert spectrum_task(ctx, model_id, job_id) == "skipped"  # the copy sent again finds the job over
    assert_same_curvature(stored(ctx, model_id), reference)


def test_the_task_that_died_finishing_is_finished_by_its_redelivery(ctx, reference, monkeypatch):
    model_id, job_id = register(ctx)
    transport = Transport()
    build_task(ctx, model_id, job_id, transport)
    for shard in transport.take():
        shard_task(ctx, model_id, job_id, shard, transport)
    parts = transport.take_parts()
    for part in parts:
        part_task(ctx, model_id, job_id, part)

    worker_dies = dies("the worker died after winning the finish")
    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(build, "_finish", worker_dies)
        spectrum_task(ctx, model_id, job_id)
    assert shards.phase_of(ctx, job_id) == "measured-by-spectrum"
    assert part_task(ctx, model_id, job_id, parts[0]) == "done"  # a part again: the finish is not its own
    assert ctx.models.get(model_id).status == "building"
    assert spectrum_task(ctx, model_id, job_id) == "done"  # the same task again: it finishes
    assert ctx.models.get(model_id).status == "ready" and ctx.jobs.get(job_id).status == "succeeded"
    assert_same_build(stored(ctx, model_id), reference)


def test_a_registration_after_a_failed_build_resumes_from_its_shards(ctx, reference):
    first_model, first_job = register(ctx)
    transport = Transport()
    build_task(ctx, first_model, first_job, transport)
    shard_task(ctx, first_model, first_job, 0)
    shard_task(ctx, first_model, first_job, 2)
    ctx.jobs.request_cancel(first_job)
    shard_task(ctx, first_model, first_job, 1)
    assert ctx.jobs.get(first_job).status == "cancelled"
    transport.take()

    model_id, job_id = register(ctx)  # the same model and data again
    assert build_task(ctx, model_id, job_id, transport) == "handed-on"
    assert transport.take() == [1, 3]  # 0 and 2 are on disk
    assert ctx.models.get(model_id).examples_encoded == 32
    shard_task(ctx, model_id, job_id, 3, transport)
    shard_task(ctx, model_id, job_id, 1, transport)
    measure(ctx, model_id, job_id, transport)
    assert_same_build(stored(ctx, model_id), reference)


def test_a_shard_whose_worker_keeps_dying_fails_the_job_and_the_model(ctx):
    model_id, job_id = register(ctx)
    build_task(ctx, model_id, job_id, Transport())
    for _ in range(ctx.settings.max_deliveries):
        ctx.jobs.hincr(job_id, "build_2_attempts")  # started that many times, its worker dying each time
    assert shard_task(ctx, model_id, job_id, 2) == "skipped"
    job, model = ctx.jobs.get(job_id), ctx.models.get(model_id)
    assert job.status == "failed" and job.error.code == "redelivery-limit"
    assert model.status == "failed" and model.error.code == "redelivery-limit"
