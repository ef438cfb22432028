"""RFC 9457 problem+json for every error the API can answer, and the handlers that map
exceptions (ours, FastAPI's, Starlette's, redis-py's, the record stores') onto them."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from celery.exceptions import OperationalError as BrokerOperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from api_schemas import Problem
from records.errors import IdempotencyConflict, JobNotCancellable, JobNotFound, ModelNotFound, QueueFull

from .openapi import document_problems

log = logging.getLogger("fastif.service")

PROBLEM_BASE = "https://fastif.dev/problems/"

# slug -> (status, title). Slugs are the stable part of the contract; titles are for people.
PROBLEMS: dict[str, tuple[int, str]] = {
    "malformed-json": (400, "Malformed JSON"),
    "bad-request": (400, "Bad request"),
    "unauthorized": (401, "Missing or invalid API key"),
    "forbidden": (403, "Needs an admin key"),
    "not-found": (404, "Not found"),
    "model-not-found": (404, "Model not found"),
    "job-not-found": (404, "Job not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "model-not-ready": (409, "Model not ready"),
    "job-not-cancellable": (409, "Job cannot be cancelled"),
    "job-not-finished": (409, "Job has not succeeded"),
    "too-many-inputs": (413, "Too many inputs"),
    "text-too-long": (413, "Text too long"),
    "body-too-large": (413, "Request body too large"),
    "invalid-request": (422, "Invalid request"),
    "idempotency-conflict": (422, "Idempotency-Key reused with a different request"),
    "path-outside-data-root": (422, "Path outside the data root"),
    "path-not-found": (422, "Path not found"),
    "unknown-label": (422, "Unknown label"),
    "too-few-training-examples": (422, "Too few training examples"),
    "empty-data": (422, "Data file holds no examples"),
    "invalid-data-file": (422, "Data file cannot be read"),
    "queue-full": (429, "Too many queued jobs"),
    "internal-error": (500, "Internal server error"),
    "redis-unavailable": (503, "Redis unavailable"),
    "no-workers": (503, "No workers alive"),
    "insufficient-storage": (507, "Insufficient storage"),
}

# Status codes Starlette may raise on its own, mapped to our slugs.
_STATUS_SLUGS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed",
                 413: "body-too-large", 422: "invalid-request", 500: "internal-error"}


class ProblemError(Exception):
    """Raise anywhere in a request to answer with the problem `slug`."""

    def __init__(
        self,
        slug: str,
        detail: str | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """`slug` must be a key of PROBLEMS; `errors` lists field errors {loc, msg, type}."""
        if slug not in PROBLEMS:
            raise ValueError(f"unknown problem slug {slug!r}")
        super().__init__(detail or slug)
        self.slug, self.detail, self.errors, self.headers = slug, detail, errors, headers


class ProblemResponse(JSONResponse):
    """A JSON response with the problem+json media type."""

    media_type = "application/problem+json"


def problem_body(slug: str, detail: str | None, instance: str | None, errors: list[dict[str, Any]] | None = None) -> dict:
    """The JSON body of problem `slug`."""
    status, title = PROBLEMS[slug]
    problem = Problem(type=PROBLEM_BASE + slug, title=title, status=status, detail=detail,
                      instance=instance, errors=errors)
    return problem.model_dump(mode="json", exclude_none=True)


def problem_response(
    slug: str,
    detail: str | None = None,
    *,
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> ProblemResponse:
    """A ready response for problem `slug`."""
    return ProblemResponse(problem_body(slug, detail, instance, errors), status_code=PROBLEMS[slug][0], headers=headers)


def _respond(request: Request, slug: str, detail: str | None, **kwargs: Any) -> ProblemResponse:
    """problem_response with the request path as `instance`."""
    return problem_response(slug, detail, instance=request.url.path, **kwargs)


def _field_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic errors without `input` and `ctx`, which may echo large or non-JSON values."""
    return [
        {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
         "type": str(e.get("type", ""))}
        for e in errors
    ]


async def _on_problem(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ProblemError)
    return _respond(request, exc.slug, exc.detail, errors=exc.errors, headers=exc.headers)


async def _on_validation(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        reason = errors[0].get("ctx", {}).get("error", "invalid JSON")
        return _respond(request, "malformed-json", f"the body is not valid JSON: {reason}")
    fields = _field_errors(errors)
    first = fields[0] if fields else {"loc": [], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"])
    return _respond(request, "invalid-request", f"{where}: {first['msg']}", errors=fields)


async def _on_http(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = _STATUS_SLUGS.get(exc.status_code, "bad-request" if exc.status_code < 500 else "internal-error")
    detail = exc.detail if isinstance(exc.detail, str) else None
    if slug == "not-found":
        detail = f"no route {request.method} {request.url.path}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request, (headers or {}).get("Allow", ""))}
    return _respond(request, slug, detail, headers=headers)


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def _allowed_methods(request: Request, starlette_allow: str) -> str:
    """Every method the path supports (RFC 9110: Allow names the resource's methods).

    Starlette's 405 lists only the methods of the first route whose path matched, so
    `PUT /v1/models` said `Allow: POST` although GET is there too. The OpenAPI paths
    hold every method of every API path; Starlette's own list covers the other routes.
    """
    path = request.scope.get("path", "")
    methods = {m.strip().upper() for m in starlette_allow.split(",") if m.strip()}
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods.update(m.upper() for m in operations if m.upper() in _HTTP_METHODS)
    return ", ".join(m for m in _HTTP_METHODS if m in methods)


async def _on_redis_down(request: Request, exc: Exception) -> ProblemResponse:
    # The client reconnects by itself on the next call; nothing to reset here.
    log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return _respond(request, "redis-unavailable", "Redis did not answer; retry shortly",
                    headers={"Retry-After": "5"})


async def _on_record(request: Request, exc: Exception) -> ProblemResponse:
    if isinstance(exc, JobNotFound):
        return _respond(request, "job-not-found", f"no job {exc}")
    if isinstance(exc, ModelNotFound):
        return _respond(request, "model-not-found", f"no model {exc}")
    if isinstance(exc, IdempotencyConflict):
        return _respond(request, "idempotency-conflict", str(exc))
    if isinstance(exc, JobNotCancellable):
        return _respond(request, "job-not-cancellable", f"job {exc} has already finished")
    assert isinstance(exc, QueueFull)
    return _respond(request, "queue-full", str(exc), headers={"Retry-After": "30"})


async def _on_unhandled(request: Request, exc: Exception) -> ProblemResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(request, "internal-error", "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of `app` a problem+json response, and say so in its OpenAPI document."""
    document_problems(app)
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    # BusyLoadingError (Redis still loading its data) derives from ConnectionError.
    app.add_exception_handler(redis.ConnectionError, _on_redis_down)
    app.add_exception_handler(redis.TimeoutError, _on_redis_down)
    app.add_exception_handler(BrokerOperationalError, _on_redis_down)
    for record_error in (JobNotFound, ModelNotFound, IdempotencyConflict, JobNotCancellable, QueueFull):
        app.add_exception_handler(record_error, _on_record)
    # Starlette's ServerErrorMiddleware sends this and then re-raises, so servers still log it.
    app.add_exception_handler(Exception, _on_unhandled)
