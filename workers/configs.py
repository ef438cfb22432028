"""The one place where the wire contract's request models become the engine's configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from api_schemas import CorrectRequest, InfluenceInput, InfluenceRequest, SolverSettings
from fastif import LissaConfig, Query
from fastif.applications import CorrectionConfig
from fastif.config import SolverConfig


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
                        cg_tol=request.cg.tol, cg_max_iter=request.cg.max_iter)


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
