"""The quality job: the LDS of each solver configuration on a model, and what explains it.

Steps (fastif/quality/ does the measuring; this module only arranges it):

1. the retraining set: a fixed random sample of the training set (all of it when the
   request's ``train_sample`` is not below the training set's size);
2. ``subsets`` random subsets of the sample, each retrained ``seeds`` times from the
   model's influence parameters (``retrained_test_losses``; its masks are over the whole
   training set, so a sample is the masks' columns outside it left False);
3. per configuration: s_test of every held-out input (``engine.solve``), the scores of the
   sample's examples (``engine.score_rows``), and their LDS (``lds``);
4. kNN recall of the reference configuration (full scan over every training example against
   the ``knn_k`` kNN candidates), and each configuration's agreement with the reference.

The report is the job's one result item and the model record's ``quality``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from api_schemas import DataRef, Model, QualityJobRequest, QualityReport
from api_schemas.quality import MAX_HELD_OUT, MIN_TRAIN_SAMPLE
from fastif import CancelledError, FastIFError, InfluenceEngine, Query
from fastif.progress import ProgressCallback
from fastif.quality import columnwise_spearman, eval_set, lds, random_subsets, retrained_test_losses

from .configs import inputs_as_queries, retrain_config, solver_config
from .data_files import load
from .registry import engine_and_cache, ready_model
from .runner import Items, JobFailed, JobRun

# score_rows keeps one index list per row: rows are scored in groups of at most this many (row, example) pairs.
SCORE_PAIRS = 8_000_000
FIT_SOLVERS = ("ekfac", "kfac")


def training_sample(num_train: int, size: int, seed: int) -> np.ndarray:
    """The retraining set: every index when ``size`` >= ``num_train``, else a fixed sorted sample.

    QualityRequest documents the rule: ``sorted(default_rng([seed, 1]).choice(num_train, size, replace=False))``.
    """
    if size >= num_train:
        return np.arange(num_train, dtype=np.int64)
    chosen = np.random.default_rng([seed, 1]).choice(num_train, size=size, replace=False)
    return np.sort(chosen).astype(np.int64)


def sample_masks(num_train: int, sample: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """Subsets of the sample ([count, len(sample)] boolean) as masks over the whole training set."""
    masks = np.zeros((subsets.shape[0], num_train), dtype=bool)
    masks[:, sample] = subsets
    return masks


def _held_out(run: JobRun, engine: InfluenceEngine, model: Model, request: QualityJobRequest) -> list[Query]:
    if request.held_out is not None:
        return inputs_as_queries(request.held_out)
    ref: DataRef = request.held_out_from  # type: ignore[assignment]
    examples = load(run, engine, model, ref)
    if len(examples) > MAX_HELD_OUT:
        raise JobFailed("too-many-inputs", f"{ref.path} holds {len(examples)} examples; at most {MAX_HELD_OUT} "
                                           f"held-out inputs per quality job (set held_out_from.limit)")
    return [Query(text=e.text, text_pair=e.text_pair, label=e.label) for e in examples]


def _staged(run: JobRun, prefix: str) -> ProgressCallback:
    """The engine's progress, reported under ``prefix: stage``; True (cancel) passes through."""
    return lambda stage, done, total: run.progress(f"{prefix}: {stage}", done, total)


def _check_cancel(run: JobRun, stage: str, done: int, total: int) -> None:
    if run.progress(stage, done, total):
        raise CancelledError(f"cancelled at {stage}")



class Solved(NamedTuple):
    """A configuration's s_test rows, and their blocks of low rank as factors (``Solution.factors``; None: none)."""

    rows: torch.Tensor
    factors: list | None


def _scores(engine: InfluenceEngine, solved: Solved, indices: np.ndarray,
            on_progress: ProgressCallback | None) -> np.ndarray:
    """I(z_i, z_t) for each solved row and each training index of ``indices``: [q, len(indices)]."""
    s_tests, factors = solved
    rows = len(s_tests)
    per_group = max(1, SCORE_PAIRS // max(1, len(indices)))
    out = np.zeros((rows, len(indices)), dtype=np.float64)
    for begin in range(0, rows, per_group):
        end = min(rows, begin + per_group)
        scored = engine.score_rows(s_tests[begin:end], [indices] * (end - begin), on_progress=on_progress,
                                   factors=factors[begin:end] if factors is not None else None)
        out[begin:end] = np.stack(scored)
    return out


def knn_recall(engine: InfluenceEngine, search: Sequence, full_scores: np.ndarray, k: int, top: int) -> list[float]:
    """Per input: the share of its ``top`` most helpful and ``top`` most harmful training examples
    (by full-scan score) among its ``k`` kNN candidates (``engine.candidates``)."""
    recalls = []
    for row, query in enumerate(search):
        ranking = np.argsort(full_scores[row], kind="stable")
        wanted = set(ranking[:top].tolist()) | set(ranking[::-1][:top].tolist())
        candidates = set(engine.candidates(query, k).indices.tolist())
        recalls.append(len(wanted & candidates) / len(wanted))
    return recalls


def _fit_seconds(engine: InfluenceEngine, model: Model, solver: str) -> float | None:
    """The one-time fit of a factored solver: as the build measured it, else as long as loading or fitting takes now."""
    if solver not in FIT_SOLVERS:
        return None
    clock = time.perf_counter()
    engine.factors()
    now = time.perf_counter() - clock
    built = model.curvature.seconds.get("ekfac") if model.curvature is not None else None
    return float(built) if built is not None else now


def _warm_up(engine: InfluenceEngine, config) -> None:
    """Measure (or load) the spectrum a relative damping refers to before the solve is timed."""
    if not config.lissa_absolute and (config.damping is None or config.solver == "lissa"):
        engine.spectrum(config.curvature)


def _measure(run: JobRun, engine: InfluenceEngine, model: Model, named, plan, sample: np.ndarray,
             subsets: np.ndarray, losses: np.ndarray) -> tuple[dict, np.ndarray, Solved]:
    """One configuration's LDS item, its scores of the sample [q, n] and its solved rows."""
    config = solver_config(named)
    fit = _fit_seconds(engine, model, config.solver)
    _warm_up(engine, config)
    progress = _staged(run, f"scoring {named.name}")
    clock = time.perf_counter()
    rows = range(len(plan.vectors))
    solution = engine.solve(plan.vectors, config, progress, engine.gradient_factors(plan, config, rows))
    solved = Solved(solution.vectors, solution.factors)
    scores = _scores(engine, solved, sample, progress)
    per_query = (time.perf_counter() - clock) / len(plan.vectors)
    result = lds(scores, subsets, losses)
    item = {"lds": result.mean, "lds_stderr": None if result.num_inputs < 2 else result.standard_error,
            "per_input": list(result.per_input), "constant": result.constant, "seconds_fit": fit,
            "seconds_per_query": per_query, "solver": solution.diagnostics()}
    return item, scores, solved


def run_quality(run: JobRun) -> Items:
    request = QualityJobRequest.model_validate(run.request)
    model = ready_model(run, request.model_id)
    started = time.perf_counter()
    run.progress("loading", 0, 1)
    engine, _ = engine_and_cache(run, model)
    queries = _held_out(run, engine, model, request)
    num_train = engine.num_train
    sample = training_sample(num_train, request.train_sample, request.seed)
    size = max(1, int(round(request.fraction * len(sample))))
    if num_train < MIN_TRAIN_SAMPLE or size >= len(sample):
        raise JobFailed("too-few-training-examples",
                        f"{num_train} training examples (sample {len(sample)}, subsets of {size}) "
                        "are too few for the LDS")
    subsets = random_subsets(len(sample), request.subsets, request.fraction, request.seed)
    retrain = retrain_config(request)
    seconds: dict[str, float] = {"loading": time.perf_counter() - started}

    clock = time.perf_counter()
    tests = eval_set(engine, queries)  # resolves the labels (names or ids); a bad one fails the job
    losses = retrained_test_losses(engine, sample_masks(num_train, sample, subsets), tests, retrain,
                                   on_progress=run.progress)
    seconds["retraining"] = time.perf_counter() - clock

    clock = time.perf_counter()
    plan = engine.plan(queries)
    seconds["gradients"] = time.perf_counter() - clock
    q = len(queries)
    reference = request.reference
    measured: dict[str, str] = {}  # settings identity -> the first configuration measured with them
    items, scores_of, solved_of = [], {}, {}
    clock = time.perf_counter()
    for number, named in enumerate(request.configurations):
        _check_cancel(run, f"scoring {named.name}", number, len(request.configurations))
        head = {"name": named.name, "settings": named.model_dump(mode="json", exclude={"name"}), "same_as": None}
        identity = json.dumps(solver_config(named).cache_identity(), sort_keys=True)
        if identity in measured:
            first = measured[identity]
            done = next(item for item in items if item["name"] == first)
            items.append({**done, **head, "same_as": first})
            if first in scores_of:
                scores_of[named.name], solved_of[named.name] = scores_of[first], solved_of[first]
            continue
        measured[identity] = named.name
        try:
            item, scores_of[named.name], solved_of[named.name] = _measure(
                run, engine, model, named, plan, sample, subsets, losses)
        except CancelledError:
            raise
        except (FastIFError, ValueError) as err:
            # A configuration that cannot run here (LiSSA diverging, a relative damping of a curvature
            # with no positive mean eigenvalue) is reported as such; the others are still measured.
            if named.name == reference:
                raise JobFailed(getattr(err, "code", "invalid-request"),
                                f"the reference configuration {named.name!r} failed: {err}") from err
            item = {"error": {"code": getattr(err, "code", "invalid-request"), "message": str(err)}}
        items.append({**head, **item})
    seconds["scoring"] = time.perf_counter() - clock

    clock = time.perf_counter()
    _check_cancel(run, "knn recall", 0, 1)
    if len(sample) == num_train:
        full = scores_of[reference]
    else:
        full = _scores(engine, solved_of[reference], np.arange(num_train, dtype=np.int64), _staged(run, "knn recall"))
    recalls = knn_recall(engine, plan.search, full, request.knn_k, request.top)
    seconds["knn_recall"] = time.perf_counter() - clock

    agreement = {}
    for named in request.configurations:
        if named.name in scores_of:
            rho, _ = columnwise_spearman(scores_of[reference].T, scores_of[named.name].T)
            agreement[named.name] = float(rho.mean())
    seconds["total"] = time.perf_counter() - started
    noise = lds(scores_of[reference], subsets, losses).retraining_noise  # of the losses alone
    best = max((item for item in items if item.get("lds") is not None), key=lambda item: item["lds"])
    report = QualityReport.model_validate({
        "job_id": run.job_id, "model_id": model.id, "finished_at": time.time(), "reference": reference,
        "best": best["name"], "configurations": items, "retraining_noise": noise,
        "knn_recall": {"k": min(request.knn_k, num_train), "top": request.top, "space": engine.index_config.space,
                       "reference": reference, "mean": float(np.mean(recalls)), "per_input": recalls},
        "solver_agreement": agreement,
        "sizes": {"num_train": num_train, "train_sample": len(sample), "subset_size": int(subsets[0].sum()),
                  "subsets": request.subsets, "seeds": request.seeds, "held_out": q},
        "retrain": request.retrain.model_dump(mode="json"),
        "seconds": seconds,
    }).model_dump(mode="json")
    run.ctx.models.set_quality(model.id, report)
    return [report]
