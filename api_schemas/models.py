"""Model registration (request) and the model resource (response)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from .common import ErrorInfo, FiniteFloat, RequestModel, ResponseModel

NonEmptyStr = Annotated[str, Field(min_length=1, max_length=4096)]
ModelStatus = Literal["building", "ready", "failed"]


class TrainData(RequestModel):
    """Where the training examples live (relative to the data root) and which columns to read."""

    path: NonEmptyStr = Field(description="a JSON Lines, CSV or TSV file, or a folder of a Hugging Face dataset "
                                          "saved with save_to_disk, relative to the data root")
    text_field: NonEmptyStr = Field("text", description="the field holding each example's text")
    text_pair_field: NonEmptyStr | None = Field(
        None, description="the field holding the second text of a pair (NLI); none for single texts")
    label_field: NonEmptyStr = Field("label", description="the field holding the label: a name or an index")
    format: Literal["auto", "jsonl", "csv", "tsv", "hf"] = Field(
        "auto", description="auto: from the extension (.jsonl, .json, .ndjson, .csv, .tsv; a folder is hf)")
    quoting: Literal["minimal", "none"] = Field(
        "minimal", description="CSV and TSV: none reads quote characters as text (SST-2's TSV holds stray ones)")


class InfluenceSettings(RequestModel):
    """Which parameters the influence is taken over, and the loss's explicit L2 term."""

    params: Literal["auto"] | Annotated[list[NonEmptyStr], Field(min_length=1)] = "auto"
    weight_decay: Annotated[FiniteFloat, Field(ge=0)] = 0.0
    max_length: Annotated[int, Field(strict=True, ge=8, le=512)] = 128


class IndexSettings(RequestModel):
    """The kNN index that picks each query's candidates."""

    kind: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="auto: flat up to 200,000 training examples, above that ivf with nprobe chosen at build "
                            "time for a measured recall@1000 of flat's neighbours of at least 0.95 (the model's "
                            "index report); flat: exact; ivf (16 cells searched) or hnsw: approximate, faster at "
                            "hundreds of thousands of examples")
    space: Literal["gradient", "feature"] = Field(
        "gradient", description="gradient: the training examples whose output-layer loss gradient has the largest "
                                "inner product (either sign) with the input's; feature: FastIF's L2 neighbours of the "
                                "first-token features")
    prefix: Literal["cached", "recompute"] = Field(
        "cached", description="cached: the frozen layers' output for every training example is kept on the state "
                              "volume (tokens × hidden numbers each) and replayed; recompute: nothing is kept and the "
                              "frozen layers run again for the examples a query touches (slower queries, no storage)")
    prefix_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="how cached activations are stored: float16 and bfloat16 take half the bytes of "
                               "float32, with scores that rank the same (Spearman ≥ 0.999 against float32 measured)")
    shard_examples: Annotated[int, Field(strict=True, ge=16, le=1_000_000)] = Field(
        1024, description="the build runs as tasks of this many training examples, which every worker takes from "
                          "the queue; a shard whose worker died is done again, and registering again after a "
                          "failed build resumes from the shards already written")


class ModelCreate(RequestModel):
    """Body of POST /v1/models."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    model_path: NonEmptyStr
    train_data: TrainData
    influence: InfluenceSettings = Field(default_factory=InfluenceSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)


class SpectrumInfo(ResponseModel):
    """The curvature's spectrum, measured at build time on a fixed sample of the training set."""

    curvature: str
    largest: FiniteFloat  # largest eigenvalue (Lanczos)
    smallest: FiniteFloat  # smallest Ritz value (an upper bound on the smallest eigenvalue)
    mean: FiniteFloat  # trace / number of influence parameters (Hutchinson)
    trace: FiniteFloat
    trace_stderr: FiniteFloat | None = None
    num_params: int
    examples: int


class CurvatureInfo(ResponseModel):
    """What a relative damping is relative to, and the EK-FAC fit the default solver uses."""

    spectra: dict[str, SpectrumInfo] = Field(default_factory=dict)
    ekfac_examples: int | None = None  # training examples the EK-FAC factors were fitted on
    ekfac_uncovered: list[str] = Field(default_factory=list)  # parameters preconditioned by a damped identity
    seconds: dict[str, FiniteFloat] = Field(default_factory=dict)


class IndexInfo(ResponseModel):
    """The kNN index a build made ("auto" resolved) and the recall it measured."""

    kind: Literal["flat", "ivf", "hnsw"]
    nlist: int | None = Field(None, description="IVF cells")
    nprobe: int | None = Field(None, description="IVF cells searched per query")
    recall_at_1000: Annotated[FiniteFloat, Field(ge=0, le=1)] = Field(
        description="the share of the exact (flat) index's min(1000, N) neighbours the index finds, both signs "
                    "of the inner product searched as every query does, averaged over `queries` training "
                    "examples; 1 for flat, which is exact")
    queries: int = Field(description="training examples searched to measure the recall; 0 for flat (nothing to measure)")


class Model(ResponseModel):
    """A registered model and the state of its build (features, kNN index, curvature)."""

    id: str
    name: str
    status: ModelStatus
    created_at: datetime
    ready_at: datetime | None = None
    error: ErrorInfo | None = None
    request: ModelCreate
    num_train: int | None = None
    examples_encoded: int | None = Field(None, description="training examples the build has written so far (all of "
                                                           "them once ready); a build resumed after a failure starts "
                                                           "from those already on the state volume")
    labels: list[str] | None = None
    fingerprint: str | None = None
    build_job_id: str | None = None
    curvature: CurvatureInfo | None = None
    index: IndexInfo | None = None
    bytes_on_disk: int | None = Field(None, description="what the build keeps on the state volume for this model's "
                                                        "fingerprint (features, keys, activations, indices, factors)")
    # The latest report of POST /v1/models/{id}/quality (LDS per solver configuration, ...).
    quality: dict[str, Any] | None = None


class ModelList(ResponseModel):
    """GET /v1/models: newest first."""

    items: list[Model]
