"""FastAPI dependencies: the app's settings, Redis client, stores and Celery app; who is calling, and what they may see.

Everything lives on `app.state`, built once per app by create_app, so two apps in one
process (tests) never share a client.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from api_schemas import Job
from records.api_keys import ApiKey, Role
from records.errors import JobNotFound
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
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="One of FASTIF_API_KEYS (`name:key:role` or a bare admin key)")


@dataclass(frozen=True)
class Caller:
    """Who is asking: the name and role of the API key that came with the request.

    Without configured keys every caller is an anonymous admin (`name` None), as the service was before keys.
    """

    name: str | None
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def sees(self, job: Job) -> bool:
        """Admins see every job; a client key only the jobs it created."""
        return self.is_admin or job.owner == self.name


ANONYMOUS = Caller(name=None, role="admin")


def authenticate(request: Request, settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)]) -> Caller:
    """The caller of X-API-Key; 401 unless no keys are configured or it matches one of them."""
    if not settings.credentials:
        return ANONYMOUS
    given = (key or "").encode("utf-8")
    # Compare against every key, in constant time each, so timing reveals neither key nor index.
    matched: ApiKey | None = None
    for configured in settings.credentials:
        if secrets.compare_digest(given, configured.secret.encode("utf-8")):
            matched = configured
    if matched is None:
        raise ProblemError(
            "unauthorized",
            "missing X-API-Key header" if key is None else "the X-API-Key is not valid",
            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
        )
    request.app.state.metrics.requests_by_key.labels(matched.name).inc()
    return Caller(name=matched.name, role=matched.role)


CallerDep = Annotated[Caller, Depends(authenticate)]
# FastAPI runs a dependency once per request, so a router's Authenticated and a route's CallerDep check the key once.
Authenticated = Depends(authenticate)


def require_admin(caller: CallerDep) -> Caller:
    """403 forbidden unless the caller's key is an admin key."""
    if not caller.is_admin:
        raise ProblemError("forbidden", f"the API key {caller.name!r} is a client key; this needs an admin key")
    return caller


AdminOnly = Depends(require_admin)


def visible_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> Job:
    """The job `job_id` if the caller may see it; 404 job-not-found otherwise, so ids of others' jobs do not leak."""
    job = jobs.require(job_id)  # JobNotFound -> 404 job-not-found
    if not caller.sees(job):
        raise JobNotFound(job_id)
    return job


VisibleJob = Annotated[Job, Depends(visible_job)]
