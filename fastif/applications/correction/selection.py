"""Which points a round steps on: helpful (most negative influence), harmful (most positive), random.

Each sign is searched on its own. In the gradient space an index key's inner product
with the anchors' has a sign, and influence is -⟨∇L(z), s_test⟩: the helpful side is
the largest inner products, the harmful side the most negative ones, and each gets
its own k candidates (asking for the largest in absolute value lets the stronger side
crowd the other out). Then only points of the right sign are taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...engine import InfluenceEngine
from ...query import Query, Solver, TensorCache
from ...progress import ProgressCallback
from ..examples import ExampleSet, influence_scores


@dataclass(frozen=True)
class Scored:
    """Candidates of one side with their influence on the round's anchors."""

    indices: np.ndarray  # into the candidate set
    scores: np.ndarray  # I(z, anchors); negative = helpful


@dataclass(frozen=True)
class RoundInfluence:
    helpful: Scored
    harmful: Scored
    s_test_norm: float  # of the anchors' mean gradient's s_test, on the model as it is now
    diagnostics: dict


@dataclass(frozen=True)
class Chosen:
    indices: list[int]  # into the candidate set
    scores: list[float] | None  # None for random points
    available: int  # how many candidates of the strategy's sign there were (every candidate for random)


def round_influence(
    engine: InfluenceEngine,
    candidates: ExampleSet,
    anchors: Sequence[Query],
    solver: Solver,
    k: int | None,
    cache: TensorCache | None,
    on_progress: ProgressCallback | None = None,
) -> RoundInfluence:
    """s_test of the anchors' mean gradient on the live model, and both sides' candidates scored by it."""
    plan = engine.plan(anchors, group=True, cache=cache)
    s_tests, diagnostics, _, _ = engine.cached_s_test(plan, solver, cache, on_progress)
    query = plan.search[0]
    aligned, _ = candidates.nearest(query, k, side="aligned")
    opposed, _ = candidates.nearest(query, k, side="opposed")
    union = np.unique(np.concatenate([aligned, opposed]))
    scores = influence_scores(engine, candidates, s_tests[0], union, on_progress=on_progress)
    score_of = dict(zip(union.tolist(), scores))

    def side(indices: np.ndarray) -> Scored:
        return Scored(indices, np.array([score_of[int(i)] for i in indices], dtype=np.float64))

    return RoundInfluence(side(aligned), side(opposed), float(s_tests[0].norm()), diagnostics)


def choose(strategy: str, influence: RoundInfluence | None, num_points: int, candidates: int,
           rng: np.random.Generator) -> Chosen:
    """The round's points: the ``num_points`` strongest of the strategy's sign, or uniformly random ones."""
    if strategy == "random":
        picked = rng.choice(candidates, size=min(num_points, candidates), replace=False)
        return Chosen([int(i) for i in picked], None, candidates)
    side = influence.helpful if strategy == "helpful" else influence.harmful
    sign = -1.0 if strategy == "helpful" else 1.0
    of_sign = np.flatnonzero(side.scores * sign > 0)
    order = of_sign[np.argsort(-sign * side.scores[of_sign], kind="stable")][:num_points]
    return Chosen([int(side.indices[i]) for i in order], [float(side.scores[i]) for i in order], len(of_sign))
