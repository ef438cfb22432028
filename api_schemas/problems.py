"""RFC 9457 problem details, the body of every error response."""

from __future__ import annotations

from pydantic import BaseModel


class FieldError(BaseModel):
    """One validation failure: where (`loc`), what (`msg`) and its pydantic error `type`."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """application/problem+json; `type` is stable, `https://fastif.dev/problems/<slug>`."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None
