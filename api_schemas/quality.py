"""Body of POST /v1/models/{model_id}/quality and its one result item, the quality report.

The report says how faithful the model's influence scores are: the linear datamodeling
score (LDS) of each solver configuration (fastif/quality/), how reproducible the
retraining is, how many of each input's most influential training examples the kNN
candidates hold, and how far the configurations agree with the reference one.
The latest report is also kept on the model record (GET /v1/models/{id}, `quality`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .applications import DataRef, LabelledInput, ModelId
from .common import ErrorInfo, FiniteFloat, RequestModel, ResponseModel
from .influence import LissaConfig, SolverSettings

MIN_TRAIN_SAMPLE = 20
MAX_HELD_OUT = 1000
REFERENCE_CONFIGURATION = "default"
ConfigurationName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class RetrainSettings(RequestModel):
    """How each training subset is retrained (fastif.quality.RetrainConfig): from the model's
    fine-tuned influence parameters, on the cached frozen prefix, with the engine's objective.

    The defaults are RetrainConfig's (a test checks that they agree): the cheapest retraining
    measured whose two seeds agree to a Spearman above 0.85 (fastif/quality/)."""

    epochs: Annotated[int, Field(strict=True, ge=1, le=100)] = 5
    lr: Annotated[FiniteFloat, Field(gt=0, le=10)] = 3e-5
    # null: full batch (one step per epoch).
    batch_size: Annotated[int, Field(strict=True, ge=1, le=4096)] | None = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["constant", "linear"] = "linear"


class NamedSolverSettings(SolverSettings):
    """One solver configuration to measure: a name and the solver settings of every influence request."""

    name: ConfigurationName


def default_configurations() -> list[NamedSolverSettings]:
    """The service's default, FastIF's published configuration, CG, EK-FAC and a plain gradient dot product."""
    return [
        NamedSolverSettings(name=REFERENCE_CONFIGURATION),
        NamedSolverSettings(name="fastif_paper", solver="lissa", curvature="hessian",
                            lissa=LissaConfig(damp=0.005, scale=1e4, depth=1000, batch_size=1)),
        NamedSolverSettings(name="cg", solver="cg", curvature="gauss-newton"),
        NamedSolverSettings(name="ekfac", solver="ekfac"),
        NamedSolverSettings(name="identity", solver="identity"),
    ]


class QualityRequest(RequestModel):
    """POST /v1/models/{model_id}/quality: the LDS of each solver configuration, and more.

    Held-out inputs with gold labels: inline `held_out`, or `held_out_from` a file in the
    data root (fields left out are those of the model's training data); exactly one.
    The retraining set is a fixed random sample of `train_sample` training examples
    (all of them when the model has no more): `sorted(numpy.random.default_rng([seed, 1])
    .choice(num_train, train_sample, replace=False))`. `subsets` random subsets of it,
    each holding round(`fraction` × sample) examples (fastif.quality.random_subsets with
    `seed`), are each retrained `seeds` times (shuffling seeds from `seed`).
    The reference configuration (kNN recall, solver agreement) is the one named
    `default`, else the first.
    """

    held_out: Annotated[list[LabelledInput], Field(min_length=1, max_length=MAX_HELD_OUT)] | None = None
    held_out_from: DataRef | None = None
    train_sample: Annotated[int, Field(strict=True, ge=MIN_TRAIN_SAMPLE, le=1_000_000)] = 2000
    subsets: Annotated[int, Field(strict=True, ge=4, le=1000)] = 40
    fraction: Annotated[FiniteFloat, Field(gt=0, lt=1)] = 0.5
    seeds: Annotated[int, Field(strict=True, ge=1, le=16)] = 2
    seed: Annotated[int, Field(strict=True, ge=0, le=2**32 - 1)] = 0
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    configurations: Annotated[list[NamedSolverSettings], Field(min_length=1, max_length=16)] = Field(
        default_factory=default_configurations)
    # kNN recall: the share of each input's `top` most helpful and `top` most harmful training
    # examples (full scan, reference configuration) among its `knn_k` kNN candidates.
    knn_k: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 1000
    top: Annotated[int, Field(strict=True, ge=1, le=100)] = 10

    @model_validator(mode="after")
    def _one_source_unique_names(self) -> QualityRequest:
        if (self.held_out is None) == (self.held_out_from is None):
            raise ValueError("give exactly one of 'held_out' (inline inputs) or 'held_out_from' (a file)")
        names = [c.name for c in self.configurations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"configuration names must be unique; repeated: {repeated}")
        return self

    @property
    def reference(self) -> str:
        names = [c.name for c in self.configurations]
        return REFERENCE_CONFIGURATION if REFERENCE_CONFIGURATION in names else names[0]


class QualityJobRequest(QualityRequest):
    """What a quality job's record holds: the body and the model it measures (from the path)."""

    model_id: ModelId


# -- the result ------------------------------------------------------------------------------------
class ConfigurationQuality(ResponseModel):
    """The LDS of one configuration: Spearman's ρ per held-out input, its mean and standard error.

    A configuration that could not run on this model (LiSSA diverged, a relative damping of a
    curvature without a positive mean eigenvalue) has `error` and no LDS.
    """

    name: str
    settings: dict[str, Any]  # the NamedSolverSettings as measured (without the name)
    lds: FiniteFloat | None = None
    lds_stderr: FiniteFloat | None = None  # None with a single held-out input
    per_input: list[FiniteFloat] = Field(default_factory=list)
    constant: int = 0  # inputs whose subset sums or losses did not vary (their ρ counted as 0)
    seconds_fit: FiniteFloat | None = None  # the one-time fit (EK-FAC / K-FAC factors), when the solver has one
    seconds_per_query: FiniteFloat | None = None  # s_test and scoring of the training sample, per held-out input
    solver: dict[str, Any] = Field(default_factory=dict)  # the solver's own account (converged, iterations, λ)
    same_as: str | None = None  # scores reused from an earlier configuration with identical settings
    error: ErrorInfo | None = None


class KnnRecall(ResponseModel):
    k: int
    top: int
    space: str  # the space the model's index searches
    reference: str  # the configuration whose full-scan scores rank the training examples
    mean: FiniteFloat
    per_input: list[FiniteFloat]


class QualitySizes(ResponseModel):
    num_train: int
    train_sample: int
    subset_size: int
    subsets: int
    seeds: int
    held_out: int


class QualityReport(ResponseModel):
    """The one result item of a quality job (also the model record's `quality`)."""

    job_id: str
    model_id: str
    finished_at: FiniteFloat  # seconds since the epoch
    reference: str
    best: str  # the configuration with the highest LDS
    configurations: list[ConfigurationQuality]
    # Spearman's ρ between two retraining seeds' losses across subsets, mean over inputs (None with one seed).
    retraining_noise: FiniteFloat | None = None
    knn_recall: KnnRecall
    # Per configuration: Spearman's ρ between its scores and the reference's over the training sample, mean over inputs.
    solver_agreement: dict[str, FiniteFloat]
    sizes: QualitySizes
    retrain: dict[str, Any]
    seconds: dict[str, FiniteFloat]
