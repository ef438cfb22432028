"""Result items of influence jobs and the paginated results page."""

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
    text_pair: str | None = None
    label: str
    knn_distance: FiniteFloat | None = None


class Diagnostics(ResponseModel):
    """How the result was obtained: which solver, its own convergence, cache use, seconds per stage.

    `converged`: LiSSA's norm settled, CG reached its tolerance (`relative_residual`),
    EK-FAC, K-FAC and identity are direct. `lissa_converged` repeats it for older clients.
    """

    solver: str | None = None
    curvature: str | None = None
    converged: bool | None = None
    iterations: int | None = None
    damping: FiniteFloat | None = None  # λ (per-block λ: their mean over the parameters)
    damping_scope: str | None = None  # when λ was relative: to the whole curvature or to each block
    damping_ratio: FiniteFloat | None = None
    relative_residual: FiniteFloat | None = None
    lissa_scale: FiniteFloat | None = None  # LiSSA's scale: as given, or derived (and raised 10× per restart)
    lissa_retries: int | None = None
    lissa_converged: bool
    s_test_norm: FiniteFloat
    cached: bool
    seconds: dict[str, FiniteFloat] = Field(default_factory=dict)


class ResultItem(ResponseModel):
    """One result item of an influence job, per input, in input order."""

    input_index: int
    prediction: Prediction
    label_used: str
    helpful: list[Influential]
    harmful: list[Influential]
    diagnostics: Diagnostics


class ResultsPage(ResponseModel):
    """GET /v1/jobs/{job_id}/results: items[offset:offset+limit] of `total`.

    Items are kept as stored so that every job kind can use this page; for kind
    `influence` each item is a ResultItem.
    """

    job_id: str
    offset: int
    limit: int
    total: int
    items: list[dict[str, Any]]
