"""The one place where the wire contract's request models become the engine's configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from api_schemas import (
    CorrectRequest,
    DataFileFields,
    IndexSettings,
    InfluenceInput,
    InfluenceRequest,
    InfluenceSettings,
    QualityJobRequest,
    SolverSettings,
    TrainData,
)
from fastif import DataSpec, IndexConfig, InfluenceSpec, LissaConfig, Query
from fastif.applications import CorrectionConfig
from fastif.config import SolverConfig
from fastif.quality import RetrainConfig


def solver_config(request: SolverSettings, seed_offset: int = 0) -> SolverConfig:
    """The engine's SolverConfig for a request; ``seed_offset`` shifts LiSSA's seed (parallel shards, trials)."""
    lissa = request.lissa
    knobs = {"depth": lissa.depth, "batch_size": lissa.batch_size, "repeats": lissa.repeats, "seed": lissa.seed + seed_offset}
    if lissa.absolute:  # λ = damp · scale, for LiSSA with exactly these knobs (api_schemas.SolverSettings)
        engine_lissa = LissaConfig(damp=lissa.damp, scale=lissa.scale, **knobs)
        damping = engine_lissa.damping
    else:
        engine_lissa = dataclasses.replace(LissaConfig(), **knobs)
        damping = request.damping
    return SolverConfig(solver=request.solver, curvature=request.curvature, damping=damping,
                        damping_ratio=request.damping_ratio, damping_scope=request.damping_scope, lissa=engine_lissa,
                        lissa_absolute=lissa.absolute and request.solver == "lissa",
                        cg_tol=request.cg.tol, cg_max_iter=request.cg.max_iter,
                        inverse_rank_tolerance=request.inverse_rank_tolerance)


def queries_of(request: InfluenceRequest) -> list[Query]:
    return inputs_as_queries(request.inputs)


def inputs_as_queries(inputs: Sequence[InfluenceInput]) -> list[Query]:
    return [Query(text=i.text, text_pair=i.text_pair, label=i.label) for i in inputs]


def correction_config(request: CorrectRequest) -> CorrectionConfig:
    """The protocol's knobs of a POST /v1/correct body (fastif/applications/correction)."""
    return CorrectionConfig(
        num_points=request.num_points, lr=request.lr, steps=request.steps, rounds=request.rounds,
        anchors_per_round=request.anchors_per_round, trials=request.trials, seed=request.seed, k=request.candidates.k,
        strategies=tuple(request.strategies), optimizer=request.optimizer,
        params=request.params if isinstance(request.params, str) else tuple(request.params), l2=request.l2)


def retrain_config(request: QualityJobRequest) -> RetrainConfig:
    """How a quality job retrains on each subset (fastif/quality)."""
    retrain = request.retrain
    return RetrainConfig(epochs=retrain.epochs, batch_size=retrain.batch_size, lr=retrain.lr,
                         optimizer=retrain.optimizer, seeds=request.seeds, seed=request.seed, schedule=retrain.schedule)


# -- a registered model's engine, and the data files jobs name ---------------------------------------
def train_data_spec(path: Path, data: TrainData) -> DataSpec:
    """The model's training data, at ``path`` (resolved in the data root)."""
    return DataSpec(path=str(path), text_field=data.text_field, text_pair_field=data.text_pair_field,
                    label_field=data.label_field, format=data.format, quoting=data.quoting)


def data_file_spec(path: Path, ref: DataFileFields, train: TrainData) -> DataSpec:
    """A data file a job names, at ``path``: read with the model's training-data fields unless ``ref`` says otherwise."""
    return DataSpec(path=str(path), **ref.fields_over(train)._asdict())


def influence_spec(settings: InfluenceSettings) -> InfluenceSpec:
    return InfluenceSpec(params="auto" if settings.params == "auto" else tuple(settings.params),
                         weight_decay=settings.weight_decay, max_length=settings.max_length)


def index_config(settings: IndexSettings) -> IndexConfig:
    return IndexConfig(kind=settings.kind, space=settings.space, prefix=settings.prefix, prefix_dtype=settings.prefix_dtype,
                       shard_examples=settings.shard_examples)
