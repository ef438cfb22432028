"""Bodies of FastIF's application jobs (explain, graph, correct, self-influence) and their results.

Each POST answers 202 with a Job; the results come from GET /v1/jobs/{id}/results:
one item per input for explain, one item (the whole graph or the whole report) for
graph and correct, one item per ranked training example for self-influence.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, StrictStr, model_validator

from .common import FiniteFloat, PathStr, RequestModel, ResponseModel
from .data_files import DataFileFields, InputsFile
from .influence import INPUTS_FROM, InfluenceInput, InputList, LissaConfig, SolverSettings, one_input_source
from .results import Prediction, ResultItem

ModelId = Annotated[str, Field(min_length=1, max_length=128)]
Count = Annotated[int, Field(strict=True, ge=1)]
Label = Annotated[StrictStr, Field(min_length=1)] | Annotated[StrictInt, Field(ge=0)]
# A name that is safe as a folder name and in a model record.
SaveName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


# -- explain -------------------------------------------------------------------------------------
class ExplainRequest(SolverSettings):
    """POST /v1/explain: per input, the prediction and its most helpful and harmful training examples."""

    model_id: ModelId
    inputs: InputList | None = None
    inputs_from: InputsFile | None = Field(None, description=INPUTS_FROM)
    k: Count | None = 1000
    top: Annotated[int, Field(strict=True, ge=1, le=1000)] = 10
    # Also write every result item as JSON Lines to this file in the data root when the job succeeds.
    output_path: PathStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ExplainRequest:
        one_input_source(self.inputs, self.inputs_from)
        return self


class Agreement(ResponseModel):
    """How many of the top helpful (harmful) examples carry the predicted label."""

    predicted_label: str
    helpful: int
    helpful_with_predicted_label: int
    helpful_fraction: FiniteFloat | None = None
    harmful: int
    harmful_with_predicted_label: int


class ExplainItem(ResultItem):
    """One result item of an explain job: the influence item plus `agreement` (written last)."""

    agreement: Agreement


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
    """A test input (`kind` input) or a training example (`kind` train); each carries only its kind's fields."""

    id: str
    kind: Literal["input", "train"]
    input_index: int | None = None
    train_index: int | None = None
    text: str
    text_pair: str | None = None
    group: str | None = None
    prediction: Prediction | None = None
    label_used: str | None = None
    label: str | None = None
    degree: int | None = None
    total_score: FiniteFloat | None = None


class GraphEdge(ResponseModel):
    source: str  # a training example's node id
    target: str  # a test input's node id
    score: FiniteFloat
    sign: Literal["helpful", "harmful"]
    weight: FiniteFloat


class GraphSettings(ResponseModel):
    """The request's knobs the graph was drawn with."""

    k: int | None
    top: int
    threshold: FiniteFloat | None


class GraphDiagnostics(ResponseModel):
    lissa_converged: bool  # every input's solver converged
    s_test_norms: list[FiniteFloat]  # per input


class GraphResult(ResponseModel):
    """The one result item of a graph job; `images` are the URLs of the rendered picture, `files` where
    the worker wrote it (relative to the state directory)."""

    nodes: list[GraphNode]
    edges: list[GraphEdge]
    groups: list[str]
    settings: GraphSettings
    diagnostics: GraphDiagnostics
    files: dict[str, str]
    images: dict[str, str]


# -- correct -------------------------------------------------------------------------------------
class LabelledInput(InfluenceInput):
    """An input with its correct label (required)."""

    label: Label


class DataRef(DataFileFields):
    """A data file inside the data root; fields left out are those of the model's training data."""

    path: PathStr


class EvaluationSet(DataFileFields):
    """Exactly one of `path` (a DataRef's fields) or inline `examples`."""

    examples: Annotated[list[LabelledInput], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSet:
        if (self.path is None) == (self.examples is None):
            raise ValueError("give exactly one of 'path' or 'examples'")
        return self

    def data_ref(self) -> DataRef:
        """The file this set names (only when it names one)."""
        return DataRef.model_validate(self.model_dump(exclude={"examples"}))


class CandidateSource(RequestModel):
    """Where the points come from: the model's training set (default) or a `pool` never trained on."""

    pool: PathStr | DataRef | None = None
    # kNN candidates around the anchors' mean feature; null scores every candidate.
    k: Count | None = 1000


class CorrectRequest(SolverSettings):
    """POST /v1/correct: FastIF §5 error correction by its iterative protocol, against harmful and random points.

    Each of `rounds` rounds draws `anchors_per_round` anchors from `anchors` (a pool of
    labelled failing or validation examples, inline or a file in the data root), recomputes
    influence on the model as the earlier rounds left it, and takes `steps` optimiser steps
    on the `num_points` chosen points. `rounds: 1` with every anchor is the single-shot correction.
    """

    model_id: ModelId
    anchors: Annotated[list[LabelledInput], Field(min_length=1)] | EvaluationSet
    evaluation: EvaluationSet
    # A second evaluation set measured after every round too (say, held-out data of every label):
    # what the correction costs outside the slice.
    control: EvaluationSet | None = None
    candidates: CandidateSource = Field(default_factory=CandidateSource)
    rounds: Annotated[int, Field(strict=True, ge=1, le=100)] = 10
    # Default: 10, or every anchor when there are fewer.
    anchors_per_round: Annotated[int, Field(strict=True, ge=1, le=1000)] | None = None
    num_points: Annotated[int, Field(strict=True, ge=1, le=1000)] = 10
    # FastIF used 1e-4; on MiniLM that fixed under a point of any slice (bench/results/correct.md).
    lr: Annotated[FiniteFloat, Field(gt=0, le=10)] = 2e-3
    # Optimiser steps per round.
    steps: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1
    optimizer: Literal["sgd", "adam"] = "sgd"
    # "influence": the model's influence parameters; "trainable": every parameter above the frozen
    # prefix (the fine-tuned top); or name prefixes among those.
    params: Literal["influence", "trainable"] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = "influence"
    # The step's loss carries the training objective's L2 term.
    l2: bool = True
    trials: Annotated[int, Field(strict=True, ge=1, le=50)] = 3
    seed: StrictInt = 0
    strategies: Annotated[list[Literal["helpful", "harmful", "random"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["helpful", "harmful", "random"])
    # Save the model as the helpful strategy's trial 0 left it and register it under this name.
    save_as: SaveName | None = None

    @model_validator(mode="after")
    def _enough_anchors(self) -> CorrectRequest:
        inline = self.anchors if isinstance(self.anchors, list) else self.anchors.examples
        if inline is not None and self.anchors_per_round is not None and self.anchors_per_round > len(inline):
            raise ValueError(f"anchors_per_round is {self.anchors_per_round} but there are only {len(inline)} anchors")
        if self.save_as is not None and "helpful" not in self.strategies:
            raise ValueError("save_as needs the 'helpful' strategy")
        return self


class Summary(ResponseModel):
    """A figure over trials: mean, sample standard deviation, extremes, and every trial's value."""

    mean: FiniteFloat
    std: FiniteFloat
    min: FiniteFloat
    max: FiniteFloat
    values: list[FiniteFloat]


class LabelAccuracy(ResponseModel):
    count: int
    correct: int
    accuracy: FiniteFloat


class ChosenPoint(ResponseModel):
    index: int  # into the candidates (training set or pool)
    score: FiniteFloat | None = None  # influence on the round's anchors; none for random points


class ChangedExample(ResponseModel):
    """An evaluation example whose prediction the correction fixed or broke."""

    index: int
    text: str
    text_pair: str | None = None
    label: str
    before: str
    after: str


class Outcome(ResponseModel):
    """The evaluation set after a round (or at the end of a trial), against before the correction."""

    accuracy: FiniteFloat
    loss: FiniteFloat
    delta_accuracy: FiniteFloat
    delta_loss: FiniteFloat
    fixed: int
    broken: int
    per_label: dict[str, LabelAccuracy]
    confusion: list[list[int]]  # rows: gold label, columns: predicted label (the model's label order)


class RoundReport(Outcome):
    round: int
    control: Outcome | None = None  # the control set after this round, when the request gave one
    anchors: list[int]  # positions in the anchor pool drawn this round
    points: list[ChosenPoint]
    points_used: int
    points_available: int  # candidates of the strategy's sign (every candidate for random)
    s_test_norm: FiniteFloat | None = None
    fixed_ids: list[int] = Field(default_factory=list)  # positions in the evaluation set, against before the correction
    broken_ids: list[int] = Field(default_factory=list)


class TrialFinal(Outcome):
    anchor_accuracy: FiniteFloat
    anchor_loss: FiniteFloat
    fixed_examples: list[ChangedExample]  # the first 20; `fixed` counts all
    broken_examples: list[ChangedExample]
    control: Outcome | None = None


class TrialReport(ResponseModel):
    trial: int
    seed: int
    points: list[int]  # every point stepped on, round by round
    rounds: list[RoundReport]
    final: TrialFinal


class RoundSummary(ResponseModel):
    round: int
    accuracy: Summary
    loss: Summary
    delta_accuracy: Summary
    control_accuracy: Summary | None = None


class StrategyReport(ResponseModel):
    accuracy: Summary
    loss: Summary
    delta_accuracy: Summary
    delta_loss: Summary
    anchor_accuracy: Summary
    anchor_loss: Summary
    by_round: list[RoundSummary]
    control: dict[Literal["accuracy", "delta_accuracy"], Summary] | None = None  # the control set's, at the end
    trials: list[TrialReport]
    first_trial_points: list[dict[str, Any]]  # round 0 of trial 0, with texts


class CorrectionReport(ResponseModel):
    """The one result item of a correct job; `plot` is the URL of accuracy by round (PNG)."""

    candidates: dict[str, Any]
    anchors: dict[str, Any]
    evaluation: dict[str, Any]
    control: dict[str, Any] | None = None
    settings: dict[str, Any]
    strategies: dict[Literal["helpful", "harmful", "random"], StrategyReport]
    diagnostics: dict[str, Any]
    saved_model: dict[str, Any] | None = None
    plot: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


# -- self-influence ------------------------------------------------------------------------------
class SelfInfluenceRequest(SolverSettings):
    """POST /v1/self-influence: I(z, z) of training examples, most negative first (likely mislabels)."""

    model_id: ModelId
    # A random sample of this many training examples (all when null and no `indices`).
    sample: Count | None = None
    inputs_from: InputsFile | None = Field(None, description=(
        "the self-influence of a file's examples instead of training examples (a dataset job: in input order, "
        "one SelfInfluenceInputItem per input, in shards over the workers); not with sample, indices or top"))
    indices: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=100_000)] | None = None
    seed: StrictInt = 0
    # `identity`: (λI)⁻¹, i.e. -‖∇L(z)‖²/λ, no curvature. LiSSA runs shorter by default here (many rows per run).
    lissa: LissaConfig = Field(default_factory=lambda: LissaConfig(depth=100, batch_size=4))
    # Gradients solved together per LiSSA run.
    chunk: Annotated[int, Field(strict=True, ge=1, le=512)] = 32
    # Keep only the first `top` of the ranking (all when null).
    top: Count | None = None
    # Also write every result item as JSON Lines to this file in the data root when the job succeeds.
    output_path: PathStr | None = None

    @model_validator(mode="after")
    def _one_selection(self) -> SelfInfluenceRequest:
        if self.sample is not None and self.indices is not None:
            raise ValueError("give at most one of 'sample' or 'indices'")
        if self.inputs_from is not None and (self.sample is not None or self.indices is not None or self.top is not None):
            raise ValueError("inputs_from scores a file's examples in input order: not with 'sample', 'indices' or "
                             "'top', which choose and rank training examples")
        return self


class SelfInfluenceInputItem(ResponseModel):
    """One input of a self-influence dataset job (inputs_from), in input order: I(z, z) with its label used."""

    input_index: int
    self_influence: FiniteFloat
    loss: FiniteFloat
    text: str
    label: str  # the label the gradient used: the file's, else the predicted one
    predicted: str
    text_pair: str | None = None  # only for pair tasks


class SelfInfluenceItem(ResponseModel):
    """One ranked training example of a self-influence job."""

    rank: int
    train_index: int
    self_influence: FiniteFloat
    loss: FiniteFloat
    text: str
    label: str
    predicted: str
    text_pair: str | None = None  # only for pair tasks
