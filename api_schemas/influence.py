"""Body of POST /v1/influence."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr, model_validator

from .common import FiniteFloat, PathStr, RequestModel
from .data_files import InputsFile


class InfluenceInput(RequestModel):
    """One test example; `label` null means the model's predicted label."""

    text: Annotated[str, Field(min_length=1)]
    text_pair: str | None = None
    # Strict so that `true` is not read as label 1; a name or an index into the model's labels.
    label: Annotated[StrictStr, Field(min_length=1)] | Annotated[StrictInt, Field(ge=0)] | None = None


class LissaConfig(RequestModel):
    """LiSSA: h <- v + (1 - damp) h - C h / scale over `depth` batches, averaged over `repeats`.

    `damp` and `scale` null (the default): derived from the model's measured spectrum,
    scale above the largest eigenvalue and damp = λ / scale. Both given: used exactly
    as given, and λ = damp · scale (FastIF's published 0.005 and 1e4 give λ = 50).
    """

    damp: Annotated[FiniteFloat, Field(gt=0, lt=1)] | None = None
    scale: Annotated[FiniteFloat, Field(gt=0)] | None = None
    depth: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 1000
    batch_size: Annotated[int, Field(strict=True, ge=1, le=1024)] = 1
    repeats: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    # Bounded: the solver seeds torch with seed * 7919 + repeat (parallel shards add their
    # index), and torch refuses seeds past 64 bits, so an unbounded seed failed the job late.
    seed: Annotated[int, Field(strict=True, ge=0, le=2**32 - 1)] = 0

    @model_validator(mode="after")
    def _both_or_neither(self) -> LissaConfig:
        if (self.damp is None) != (self.scale is None):
            raise ValueError("give both lissa.damp and lissa.scale (an absolute configuration), or neither "
                             "(derived from the model's spectrum)")
        return self

    @property
    def absolute(self) -> bool:
        return self.damp is not None


class CGSettings(RequestModel):
    """Conjugate gradient over the whole training set: stop at this relative residual or iteration count."""

    tol: Annotated[FiniteFloat, Field(gt=0, lt=1)] = 1e-5
    max_iter: Annotated[int, Field(strict=True, ge=1, le=10_000)] = 200


SolverName = Literal["lissa", "cg", "ekfac", "kfac", "identity"]
CurvatureName = Literal["gauss-newton", "hessian"]
DEFAULT_SOLVER: SolverName = "ekfac"
# The engine's defaults (fastif.config.DEFAULT_DAMPING_RATIO; a test checks that they agree), measured by
# `fastif bench lds`: λ of each EK-FAC / K-FAC block 10 × its mean eigenvalue; for the other solvers 0.1 × the
# whole curvature's mean eigenvalue.
DEFAULT_DAMPING_RATIO: dict[str, float] = {"block": 10.0, "curvature": 0.1}
# fastif.config.DEFAULT_INVERSE_RANK_TOLERANCE (a test checks that they agree), measured by `fastif bench batch`.
DEFAULT_INVERSE_RANK_TOLERANCE = 1e-3


class SolverSettings(RequestModel):
    """How s_test = (C + λI)⁻¹ ∇L(z_t) is computed; shared by every job that computes influence.

    `curvature`: C is the Gauss-Newton matrix (positive semi-definite, the default) or
    the Hessian. `damping`: an absolute λ; null means `damping_ratio` × the curvature's
    mean eigenvalue, measured when the model was built (on the model record). FastIF's
    published configuration: `{"solver": "lissa", "curvature": "hessian",
    "lissa": {"damp": 0.005, "scale": 10000, "depth": 1000, "batch_size": 1}}`; a
    request that gives `lissa.damp` and `lissa.scale` but no `solver` means exactly that
    (LiSSA on the Hessian unless `curvature` says otherwise), as before solvers were selectable.
    """

    solver: SolverName = Field(DEFAULT_SOLVER, description=(
        "ekfac (default): EK-FAC factors fitted once per model, a few matrix products per query; kfac: the same "
        "without the eigenvalue correction; lissa: FastIF's stochastic recursion; cg: conjugate gradient over the "
        "whole training set; identity: no curvature, a plain gradient dot product over λ"))
    curvature: CurvatureName = "gauss-newton"
    damping: Annotated[FiniteFloat, Field(ge=0)] | None = None
    damping_ratio: Annotated[FiniteFloat, Field(gt=0, le=1e6)] | None = Field(None, description=(
        "λ relative to the mean eigenvalue that damping_scope names; null: 10 for scope block, 0.1 for curvature"))
    damping_scope: Literal["curvature", "block"] | None = Field(None, description=(
        "what damping_ratio multiplies: each parameter block's own mean eigenvalue (ekfac and kfac; their default) "
        "or the whole curvature's (the other solvers' default)"))
    inverse_rank_tolerance: Annotated[FiniteFloat, Field(ge=0, lt=1)] = Field(DEFAULT_INVERSE_RANK_TOLERANCE, description=(
        "ekfac and kfac: each block's damped inverse eigenvalues 1/(Λ + λ) are taken at the least rank that matches "
        "them to this fraction of their largest, which makes a query's s_test and scoring several times cheaper; "
        "0: exactly. At the default the scores agreed with the exact ones to 8e-5 of their spread on the benchmark's model"))
    lissa: LissaConfig = Field(default_factory=LissaConfig)
    cg: CGSettings = Field(default_factory=CGSettings)

    @model_validator(mode="after")
    def _consistent_solver(self) -> SolverSettings:
        # LiSSA's damp and scale are what a request meant before solvers were selectable:
        # λ = damp · scale for whichever solver it names (cg and identity used that λ too),
        # FastIF's LiSSA when it names none, and the Hessian when it names no curvature.
        if self.lissa.absolute:
            if self.damping is not None:
                raise ValueError("give either 'damping' or lissa.damp and lissa.scale (whose product is λ), not both")
            if "solver" not in self.model_fields_set:
                self.solver = "lissa"
            if "curvature" not in self.model_fields_set and self.solver in ("lissa", "cg"):
                self.curvature = "hessian"
        if self.solver in ("ekfac", "kfac") and self.curvature != "gauss-newton":
            raise ValueError(f"solver {self.solver} approximates the Gauss-Newton matrix: use curvature 'gauss-newton'")
        if self.damping_scope == "block" and self.solver not in ("ekfac", "kfac"):
            raise ValueError("damping_scope 'block' needs the blocks of solver ekfac or kfac")
        # Defaults resolved here, so that the stored request says what ran.
        if self.damping_scope is None:
            self.damping_scope = "block" if self.solver in ("ekfac", "kfac") else "curvature"
        if self.damping_ratio is None:
            self.damping_ratio = DEFAULT_DAMPING_RATIO[self.damping_scope]
        return self


def one_input_source(inputs: list | None, inputs_from: InputsFile | None) -> None:
    """A job's inputs come inline or from a file (a dataset job), never both."""
    if (inputs is None) == (inputs_from is None):
        raise ValueError("give exactly one of 'inputs' (inline) or 'inputs_from' (a file in the data root)")


InputList = Annotated[list[InfluenceInput], Field(min_length=1)]
INPUTS_FROM = ("a file of test inputs in the data root, read by the job in shards over the workers (a dataset job), "
               "in place of inline `inputs`")


class InfluenceRequest(SolverSettings):
    """Score the k nearest training examples of each input (or of the group) by influence."""

    model_id: Annotated[str, Field(min_length=1, max_length=128)]
    inputs: InputList | None = None
    inputs_from: InputsFile | None = Field(None, description=INPUTS_FROM)
    # None scores every training example.
    k: Annotated[int, Field(strict=True, ge=1)] | None = 1000
    top: Annotated[int, Field(strict=True, ge=1, le=1000)] = 10
    # LiSSA estimates from W shards with seeds seed + w, averaged (FastIF's parallel variant).
    parallel: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    group: bool = False
    # Also write every result item as JSON Lines to this file in the data root when the job succeeds.
    output_path: PathStr | None = None

    @model_validator(mode="after")
    def _parallel_is_lissa(self) -> InfluenceRequest:
        one_input_source(self.inputs, self.inputs_from)
        if self.inputs_from is not None and (self.group or self.parallel > 1):
            raise ValueError("a dataset job (inputs_from) scores each input on its own in shards over the workers: "
                             "'group' and 'parallel' go with inline inputs only")
        if self.parallel > 1 and self.solver != "lissa":
            raise ValueError(f"parallel averages LiSSA estimates from several seeds; solver {self.solver} is "
                             "deterministic: use parallel 1, or solver 'lissa'")
        return self
