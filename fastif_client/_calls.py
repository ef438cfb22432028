"""Every request of the API as data: what to send, and how the answer becomes the method's return value.

The sans-I/O half of each client method: FastIFClient and AsyncFastIFClient build the same Call
here and differ only in how they send it (see their `_send`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from api_schemas import Job, JobList, JobStatus, Model, ModelCreate, ModelList, ResultsPage

from ._core import job_kind, job_route, request_body, segment

Answer = TypeVar("Answer")
Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class Call(Generic[Answer]):
    """One HTTP request of the API and `read`, which turns its successful answer into what the method returns."""

    method: str
    path: str
    read: Callable[[httpx.Response], Answer]
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


def _body_as(model: type[Body]) -> Callable[[httpx.Response], Body]:
    """Reads an answer's JSON body as `model`."""
    return lambda response: model.model_validate(response.json())


def _nothing(response: httpx.Response) -> None:
    """Reads an answer whose body says nothing the caller needs."""


# -- models ----------------------------------------------------------------------------------------

def create_model(request: ModelCreate | Mapping[str, Any]) -> Call[Model]:
    return Call("POST", "/v1/models", _body_as(Model), json=request_body(ModelCreate, request))


def list_models(limit: int) -> Call[list[Model]]:
    return Call("GET", "/v1/models", lambda response: ModelList.model_validate(response.json()).items,
                params={"limit": limit})


def get_model(model_id: str) -> Call[Model]:
    return Call("GET", f"/v1/models/{segment(model_id)}", _body_as(Model))


def delete_model(model_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/models/{segment(model_id)}", _nothing)


# -- jobs ------------------------------------------------------------------------------------------

def submit(kind: str, request: BaseModel | Mapping[str, Any], model_id: str | None,
           idempotency_key: str | None) -> Call[Job]:
    spec = job_kind(kind)
    route = job_route(spec, model_id)  # a quality job without model_id fails before its request is checked
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
    return Call("POST", route, _body_as(Job), json=request_body(spec.request, request), headers=headers)


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{segment(job_id)}", _body_as(Job))


def list_jobs(status: JobStatus | None, limit: int) -> Call[list[Job]]:
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        params["status"] = status
    return Call("GET", "/v1/jobs", lambda response: JobList.model_validate(response.json()).items, params=params)


def cancel_job(job_id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{segment(job_id)}/cancel", _body_as(Job))


def results_page(job_id: str, offset: int, limit: int) -> Call[ResultsPage]:
    return Call("GET", f"/v1/jobs/{segment(job_id)}/results", _body_as(ResultsPage),
                params={"offset": offset, "limit": limit})


def results_stream_path(job_id: str) -> str:
    """GET this for every result item as JSON Lines (read as a stream, so not a Call)."""
    return f"/v1/jobs/{segment(job_id)}/results.jsonl"
