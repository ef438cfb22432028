"""Body of POST /v1/influence."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from .common import FiniteFloat, RequestModel


class InfluenceInput(RequestModel):
    """One test example; `label` null means the model's predicted label."""

    text: Annotated[str, Field(min_length=1)]
    text_pair: str | None = None
    # Strict so that `true` is not read as label 1; a name or an index into the model's labels.
    label: Annotated[StrictStr, Field(min_length=1)] | Annotated[StrictInt, Field(ge=0)] | None = None


class LissaConfig(RequestModel):
    """LiSSA: h <- v + (1 - damp) h - HVP(h)/scale over `depth` batches, averaged over `repeats`."""

    damp: Annotated[FiniteFloat, Field(gt=0, lt=1)] = 0.005
    scale: Annotated[FiniteFloat, Field(gt=0)] = 1e4
    depth: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 1000
    batch_size: Annotated[int, Field(strict=True, ge=1, le=1024)] = 1
    repeats: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    # Bounded: the solver seeds torch with seed * 7919 + repeat (parallel shards add their
    # index), and torch refuses seeds past 64 bits, so an unbounded seed failed the job late.
    seed: Annotated[int, Field(strict=True, ge=0, le=2**32 - 1)] = 0


class InfluenceRequest(RequestModel):
    """Score the k nearest training examples of each input (or of the group) by influence."""

    model_id: Annotated[str, Field(min_length=1, max_length=128)]
    inputs: Annotated[list[InfluenceInput], Field(min_length=1)]
    # None scores every training example.
    k: Annotated[int, Field(strict=True, ge=1)] | None = 1000
    top: Annotated[int, Field(strict=True, ge=1, le=1000)] = 10
    lissa: LissaConfig = Field(default_factory=LissaConfig)
    solver: Literal["lissa", "cg"] = "lissa"
    parallel: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    group: bool = False
