"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from records.heartbeat import alive_workers

from ...errors import ProblemError
from ..deps import AdminOnly, RedisDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up; touches nothing else."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unavailable or no workers alive"}})
def readyz(client: RedisDep) -> dict[str, object]:
    """Ready when Redis answers and at least one worker heartbeat is live."""
    client.ping()  # a ConnectionError becomes 503 redis-unavailable
    workers = alive_workers(client)
    if not workers:
        raise ProblemError("no-workers", "no worker heartbeat in the last 30 s", headers={"Retry-After": "10"})
    return {"status": "ready", "workers": len(workers)}


@router.get("/metrics", dependencies=[AdminOnly], response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format; admin keys only (it names every key and counts every route)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
