"""Bodies of FastIF's application jobs (explain, graph, correct, self-influence) and their results.

Each POST answers 202 with a Job; the results come from GET /v1/jobs/{id}/results:
one item per input for explain, one item (the whole graph or the whole report) for
graph and correct, one item per ranked training example for self-influence.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, StrictStr, model_validator

from .common import FiniteFloat, RequestModel, ResponseModel
from .influence import InfluenceInput, LissaConfig, SolverSettings
from .results import Diagnostics, Influential, Prediction

ModelId = Annotated[str, Field(min_length=1, max_length=128)]
Count = Annotated[int, Field(strict=True, ge=1)]
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]
Label = Annotated[StrictStr, Field(min_length=1)] | Annotated[StrictInt, Field(ge=0)]
# A name that is safe as a folder name and in a model record.
SaveName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


# -- explain -------------------------------------------------------------------------------------
class ExplainRequest(SolverSettings):
    """POST /v1/explain: per input, the prediction and its most helpful and harmful training examples."""

    model_id: ModelId
    inputs: Annotated[list[InfluenceInput], Field(min_length=1)]
    k: Count | None = 1000
    top: Annotated[int, Field(strict=True, ge=1, le=1000)] = 10


class Agreement(ResponseModel):
    """How many of the top helpful (harmful) examples carry the predicted label."""

    predicted_label: str
    helpful: int
    helpful_with_predicted_label: int
    helpful_fraction: FiniteFloat | None = None
    harmful: int
    harmful_with_predicted_label: int


class ExplainItem(ResponseModel):
    """One result item of an explain job (the influence item plus `agreement`)."""

    input_index: int
    prediction: Prediction
    label_used: str
    helpful: list[Influential]
    harmful: list[Influential]
    agreement: Agreement
    diagnostics: Diagnostics


# -- graph ---------------------------------------------------------------------------------------
class GraphInput(InfluenceInput):
    """A test input; inputs with the same `group` are drawn together (default: the label used)."""

    group: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class GraphRequest(SolverSettings):
    """POST /v1/graph: influence between test inputs and training examples as a graph."""

    model_id: ModelId
    inputs: Annotated[list[GraphInput], Field(min_length=1)]
    k: Count | None = 1000
    # Per input, at most `top` helpful and `top` harmful edges ...
    top: Annotated[int, Field(strict=True, ge=1, le=100)] = 5
    # ... and of those only |score| >= threshold, when given.
    threshold: Annotated[FiniteFloat, Field(ge=0)] | None = None


class GraphNode(ResponseModel):
    id: str
    kind: Literal["input", "train"]
    text: str
    text_pair: str | None = None
    input_index: int | None = None
    group: str | None = None
    prediction: Prediction | None = None
    label_used: str | None = None
    train_index: int | None = None
    label: str | None = None
    degree: int | None = None
    total_score: FiniteFloat | None = None


class GraphEdge(ResponseModel):
    source: str  # a training example's node id
    target: str  # a test input's node id
    score: FiniteFloat
    sign: Literal["helpful", "harmful"]
    weight: FiniteFloat


class GraphResult(ResponseModel):
    """The one result item of a graph job; `images` are the URLs of the rendered picture."""

    nodes: list[GraphNode]
    edges: list[GraphEdge]
    groups: list[str]
    images: dict[str, str]
    settings: dict[str, Any] = Field(default_factory=dict)
    diagnostics: dict[str, Any] = Field(default_factory=dict)


# -- correct -------------------------------------------------------------------------------------
class LabelledInput(InfluenceInput):
    """An input with its correct label (required)."""

    label: Label


class DataRef(RequestModel):
    """A data file inside the data root; fields left out are those of the model's training data."""

    path: PathStr
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"] | None = None
    quoting: Literal["minimal", "none"] | None = None
    # Read at most this many rows (the first ones).
    limit: Count | None = None


class EvaluationSet(RequestModel):
    """Exactly one of `path` (a DataRef's fields) or inline `examples`."""

    path: PathStr | None = None
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"] | None = None
    quoting: Literal["minimal", "none"] | None = None
    limit: Count | None = None
    examples: Annotated[list[LabelledInput], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSet:
        if (self.path is None) == (self.examples is None):
            raise ValueError("give exactly one of 'path' or 'examples'")
        return self


class CandidateSource(RequestModel):
    """Where the points come from: the model's training set (default) or a `pool` never trained on."""

    pool: PathStr | DataRef | None = None
    # kNN candidates around the anchors' mean feature; null scores every candidate.
    k: Count | None = 1000


class CorrectRequest(SolverSettings):
    """POST /v1/correct: FastIF §5 error correction with helpful points, against harmful and random."""

    model_id: ModelId
    anchors: Annotated[list[LabelledInput], Field(min_length=1)]
    evaluation: EvaluationSet
    candidates: CandidateSource = Field(default_factory=CandidateSource)
    num_points: Annotated[int, Field(strict=True, ge=1, le=1000)] = 10
    lr: Annotated[FiniteFloat, Field(gt=0, le=10)] = 1e-4
    steps: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1
    trials: Annotated[int, Field(strict=True, ge=1, le=50)] = 3
    seed: StrictInt = 0
    strategies: Annotated[list[Literal["helpful", "harmful", "random"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["helpful", "harmful", "random"])
    # Save the model corrected with the helpful points of trial 0 and register it under this name.
    save_as: SaveName | None = None


# -- self-influence ------------------------------------------------------------------------------
class SelfInfluenceRequest(SolverSettings):
    """POST /v1/self-influence: I(z, z) of training examples, most negative first (likely mislabels)."""

    model_id: ModelId
    # A random sample of this many training examples (all when null and no `indices`).
    sample: Count | None = None
    indices: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=100_000)] | None = None
    seed: StrictInt = 0
    # `identity`: (λI)⁻¹, i.e. -‖∇L(z)‖²/λ, no curvature. LiSSA runs shorter by default here (many rows per run).
    lissa: LissaConfig = Field(default_factory=lambda: LissaConfig(depth=100, batch_size=4))
    # Gradients solved together per LiSSA run.
    chunk: Annotated[int, Field(strict=True, ge=1, le=512)] = 32
    # Keep only the first `top` of the ranking (all when null).
    top: Count | None = None

    @model_validator(mode="after")
    def _one_selection(self) -> SelfInfluenceRequest:
        if self.sample is not None and self.indices is not None:
            raise ValueError("give at most one of 'sample' or 'indices'")
        return self


class SelfInfluenceItem(ResponseModel):
    """One ranked training example of a self-influence job."""

    rank: int
    train_index: int
    self_influence: FiniteFloat
    loss: FiniteFloat
    text: str
    text_pair: str | None = None
    label: str
    predicted: str
