"""Result items of influence jobs, of build jobs, and the paginated results page.

The workers validate every item against its job kind's model before they store it
(workers/results.py), so these models are the contract the stored JSON keeps. Fields
are declared in the order the items are written; optional fields a producer leaves out
stay out of the stored item (no nulls appear for them).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .common import FiniteFloat, ResponseModel


class Prediction(ResponseModel):
    """The model's prediction for a test input."""

    label: str
    probs: dict[str, FiniteFloat]


class Influential(ResponseModel):
    """One scored training example; negative score = helpful, positive = harmful."""

    train_index: int
    score: FiniteFloat
    text: str
    label: str
    knn_distance: FiniteFloat | None  # L2 between first-token features; null when every example was scored
    text_pair: str | None = None  # only for pair tasks


class Diagnostics(ResponseModel):
    """How the result was obtained: which solver, its own convergence, cache use, seconds per stage.

    `converged`: LiSSA's norm settled, CG reached its tolerance (`relative_residual`),
    EK-FAC, K-FAC and identity are direct. `lissa_converged` repeats it for older clients.
    The solver's own fields come first, each only when that solver reports it.
    """

    solver: str | None = None
    curvature: str | None = None
    damping_scope: str | None = None  # when λ was relative: to the whole curvature or to each block
    damping_ratio: FiniteFloat | None = None
    inverse_rank_tolerance: FiniteFloat | None = None  # ekfac, kfac: as the request gave it (0: the exact inverse)
    iterations: int | None = None
    damping: FiniteFloat | None = None  # λ (per-block λ: their mean over the parameters)
    relative_residual: FiniteFloat | None = None
    lissa_scale: FiniteFloat | None = None  # LiSSA's scale: as given, or derived (and raised 10× per restart)
    lissa_retries: int | None = None
    shards: int | None = None  # parallel LiSSA: how many shards' estimates were averaged
    converged: bool
    lissa_converged: bool
    s_test_norm: FiniteFloat
    cached: bool
    seconds: dict[str, FiniteFloat]


class CandidateScore(ResponseModel):
    """The score of one kNN candidate (``fastif analyze --json`` lists every candidate's)."""

    train_index: int
    score: FiniteFloat


class ResultItem(ResponseModel):
    """One result item of an influence job, per input, in input order."""

    input_index: int
    prediction: Prediction
    label_used: str
    helpful: list[Influential]
    harmful: list[Influential]
    diagnostics: Diagnostics
    scores: list[CandidateScore] | None = None  # every candidate's score, only when asked for


class BuildResult(ResponseModel):
    """The one result item of a model's build job."""

    model_id: str
    fingerprint: str
    num_train: int
    num_params: int


class ResultsPage(ResponseModel):
    """GET /v1/jobs/{job_id}/results: items[offset:offset+limit] of `total`.

    Items are served as stored, so that one page serves every job kind; each is the
    model of the job's `kind`: ResultItem (influence), ExplainItem (explain),
    GraphResult (graph), CorrectionReport (correct), SelfInfluenceItem
    (self_influence; SelfInfluenceInputItem for a dataset job's), QualityReport
    (quality), BuildResult (build_model). A dataset job's (`inputs_from`) pages
    are readable while it runs: the items of its finished shards from the
    first up to the first still missing (every finished shard's once it is over).
    """

    job_id: str
    offset: int
    limit: int
    total: int
    items: list[dict[str, Any]] = Field(description="The job kind's result items, as stored (see the class description)")
