"""The shapes of an influence query, as plain dataclasses: inputs, the plan, candidates and results.

The engine (fastif/engine.py) fills them; callers (the workers, the command line, the
applications) read them. None of them knows HTTP: the workers turn an ``Influence``
into the wire's result item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch

from .config import CGConfig, LissaConfig, SolverConfig
from .knn import SearchQuery

if TYPE_CHECKING:
    from .encoded import EncodedQueries

Solver = SolverConfig | LissaConfig | CGConfig


@dataclass(frozen=True)
class Query:
    """A test input; ``label`` None means the model's own prediction."""

    text: str
    text_pair: str | None = None
    label: int | str | None = None


def solver_config(solver: Solver) -> SolverConfig:
    """The one solver config; a bare LissaConfig or CGConfig means that solver on the Hessian at its absolute λ."""
    if isinstance(solver, SolverConfig):
        return solver
    if isinstance(solver, LissaConfig):
        return SolverConfig(solver="lissa", curvature="hessian", damping=solver.damping, lissa=solver, lissa_absolute=True)
    return SolverConfig(solver="cg", curvature="hessian", damping=solver.damping, cg_tol=solver.tol, cg_max_iter=solver.max_iter)


def query_key(query: Query, label: int) -> dict:
    """The cache identity of one test input's gradient and s_test (with the label its gradient used)."""
    return {"text": query.text, "text_pair": query.text_pair, "label": label}


def group_key(queries: Sequence[Query], labels: Sequence[int]) -> dict:
    return {"group": [query_key(q, label) for q, label in zip(queries, labels)]}


@dataclass
class QueryPlan:
    """The test side of a query: encoded inputs, the vectors to solve for, kNN query features."""

    encoded: EncodedQueries
    vectors: torch.Tensor  # [rows, P]: one per input, or one mean gradient for a group
    search: list[SearchQuery]  # the kNN query of each row
    keys: list[dict]  # cache identity of each row
    seconds: dict[str, float]


class SolvedTests(NamedTuple):
    """s_test of a plan's rows [rows, P], the solver's diagnostics, which rows came from a cache, and the low-rank
    factors of the rows solved now (fastif/curvature/kfac.py ``RowFactors``; None for a cached row or another solver)."""

    vectors: torch.Tensor
    diagnostics: dict
    cached: list[bool]
    factors: list[dict | None]


@dataclass
class Candidates:
    indices: np.ndarray  # train indices, nearest first
    distances: np.ndarray | None  # L2 feature distances, None when every example is scored


def feature_distances(features: np.ndarray, indices: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """L2 distances between ``feature`` and the features of ``indices``."""
    return np.sqrt(((features[indices].astype(np.float64) - feature) ** 2).sum(axis=1)).astype(np.float32)


@dataclass
class Influence:
    """The influence result of one query (or one group of queries)."""

    indices: np.ndarray
    scores: np.ndarray  # I(z_i, z_t) = -⟨∇L(z_i), s_test⟩; negative = helpful
    distances: np.ndarray | None
    converged: bool
    s_test_norm: float
    cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    solver: dict = field(default_factory=dict)  # the solver's own account: name, converged, iterations, damping, ...

    def ranked(self, top: int) -> tuple[list[int], list[int]]:
        """Positions into ``indices``: most helpful first (negative), most harmful first (positive)."""
        order = np.argsort(self.scores, kind="stable")
        helpful = [int(i) for i in order[:top] if self.scores[i] < 0]
        harmful = [int(i) for i in order[::-1][:top] if self.scores[i] > 0]
        return helpful, harmful


class TensorCache(Protocol):
    """Where the caller keeps per-test gradients and s_test between queries (the workers: Redis)."""

    def get(self, kind: str, payload: dict) -> torch.Tensor | None: ...

    def put(self, kind: str, payload: dict, tensor: torch.Tensor) -> None: ...


def through_cache(cache: TensorCache | None, kind: str, keys: Sequence[dict], compute: Callable[[list[int]], torch.Tensor],
                  device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """One row per key, stacked on ``device``: from ``cache`` where present, else ``compute(missing positions)``
    (a tensor of those rows), which are then stored; also the missing positions.

    When nothing was cached the computed tensor is returned as it is: a copy of [q, P] would fault in fresh pages.
    """
    found = [cache.get(kind, key) if cache is not None else None for key in keys]
    missing = [i for i, tensor in enumerate(found) if tensor is None]
    if not missing:
        return torch.stack([tensor.to(device) for tensor in found]), missing
    computed = compute(missing)
    for i, tensor in zip(missing, computed):
        found[i] = tensor
        if cache is not None:
            cache.put(kind, keys[i], tensor)
    if len(missing) == len(keys):
        return computed.to(device), missing
    return torch.stack([tensor.to(device) for tensor in found]), missing


def influences_of(candidates: Sequence[Candidates], scores: Sequence[np.ndarray], s_tests: torch.Tensor,
                  cached: Sequence[bool], diagnostics: dict | bool, seconds: dict[str, float]) -> list[Influence]:
    """One Influence per row; ``seconds`` are whole-job (every step runs for all rows at once)."""
    diagnostics = diagnostics if isinstance(diagnostics, dict) else {"converged": bool(diagnostics)}
    return [
        Influence(indices=found.indices, scores=row_scores, distances=found.distances,
                  converged=bool(diagnostics.get("converged", True)), s_test_norm=float(s.norm()),
                  cached=bool(was_cached), seconds=seconds, solver=dict(diagnostics))
        for found, row_scores, s, was_cached in zip(candidates, scores, s_tests, cached)
    ]
