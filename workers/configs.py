"""The one place where the wire contract's request models become the engine's configs."""

from __future__ import annotations

import dataclasses

from api_schemas import InfluenceRequest, SolverSettings
from fastif import LissaConfig, Query
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
    return [Query(text=i.text, text_pair=i.text_pair, label=i.label) for i in request.inputs]
