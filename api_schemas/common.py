"""Shared building blocks of the HTTP contract: strict request base, finite numbers, error info."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# JSON has no NaN or infinity, and a NaN hyperparameter would silently poison a solver,
# so every float in the contract rejects them.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# Integers are strict so that `true` or `"5"` never pass as a count.
StrictCount = Annotated[int, Field(strict=True)]


# A path relative to the data root (the service resolves it there and refuses anything outside).
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    """Base of every response body: tolerant of fields added by newer producers."""

    model_config = ConfigDict(extra="ignore")


class ErrorInfo(ResponseModel):
    """Why a job or a model build failed: a stable code and a human message."""

    code: str
    message: str
