"""The app's OpenAPI document, told the truth about errors.

FastAPI documents only the success status of each route and a 422 with its own
`HTTPValidationError` body as `application/json`. This API answers every error as an
RFC 9457 `application/problem+json` Problem (service/errors.py), with 4xx statuses
FastAPI cannot see (404 unknown id, 409 not ready, 413 limits, 429 queue full, ...)
and 503 when Redis or the workers are away. Clients generated from the document, and
contract tests run against it, need to know that.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from api_schemas import (BuildResult, CorrectionReport, ExplainItem, GraphResult, Problem, QualityReport, ResultItem,
                         SelfInfluenceInputItem, SelfInfluenceItem)

PROBLEM_MEDIA_TYPE = "application/problem+json"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The result items of each job kind: `ResultsPage.items` is a list of one of these (by the job's
# `kind`), so they are documented as components for clients to validate against.
RESULT_ITEMS = (ResultItem, ExplainItem, GraphResult, CorrectionReport, SelfInfluenceItem, SelfInfluenceInputItem,
                QualityReport, BuildResult)
# Routes that touch nothing (no Redis): they cannot answer 503.
_NO_BACKEND = {"/healthz"}


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}}


def add_problem_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Document the Problem body on every operation: any 4XX, 503, and FastAPI's own 422."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            # Statuses the route declares itself (FastAPI's 422, readyz's 503) keep their description.
            for status in list(responses):
                if status[0] in "45":
                    responses[status] = _problem_response(responses[status].get("description") or "Problem")
            if path in _NO_BACKEND:
                continue
            responses.setdefault("4XX", _problem_response(
                "A client error (bad body or parameters, missing API key, a client key where an admin key is "
                "needed, unknown id or another key's job, not ready, over a limit, queue full): a Problem whose "
                "`type` names it"))
            responses.setdefault("503", _problem_response("Redis or the workers are unavailable; retry later"))
    # FastAPI's validation-error schemas, once no response refers to them any more.
    for name in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)
    return schema


def add_result_items(schema: dict[str, Any]) -> dict[str, Any]:
    """The result item models as components (no route returns them directly)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in RESULT_ITEMS:
        item = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, definition in item.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault(model.__name__, item)
    return schema


def document_problems(app: FastAPI) -> None:
    """Make `app.openapi()` describe the problem+json errors the app really answers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_result_items(add_problem_responses(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
