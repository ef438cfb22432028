"""FastAPI dependencies: the app's settings, Redis client, stores and Celery app, and auth.

Everything lives on `app.state`, built once per app by create_app, so two apps in one
process (tests) never share a client.
"""

from __future__ import annotations

import secrets
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from records.jobs import JobStore
from records.models import ModelStore
from records.settings import Settings

from ..errors import ProblemError


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    """The app's Redis client."""
    return request.app.state.redis


def get_jobs(request: Request) -> JobStore:
    """The app's job store."""
    return request.app.state.jobs


def get_models(request: Request) -> ModelStore:
    """The app's model store."""
    return request.app.state.models


def get_celery(request: Request) -> Celery:
    """The app's Celery client (used only to send tasks by name)."""
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
ModelsDep = Annotated[ModelStore, Depends(get_models)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

# auto_error=False: a missing key must become our 401 problem, not FastAPI's 403.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of FASTIF_API_KEYS")


def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """401 unless no keys are configured or X-API-Key matches one of them."""
    if not settings.api_keys:
        return
    given = (key or "").encode("utf-8")
    # Compare against every key, in constant time each, so timing reveals neither key nor index.
    matched = False
    for configured in settings.api_keys:
        matched |= secrets.compare_digest(given, configured.encode("utf-8"))
    if not matched:
        raise ProblemError(
            "unauthorized",
            "missing X-API-Key header" if key is None else "the X-API-Key is not valid",
            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
        )


Authenticated = Depends(require_api_key)
