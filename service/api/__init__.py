"""The HTTP layer: dependencies and routes."""

from fastapi import APIRouter

from .deps import Authenticated
from .routes import applications, health, influence, jobs, models, quality

# Everything under /v1 needs an API key when keys are configured.
api_router = APIRouter(dependencies=[Authenticated])
api_router.include_router(models.router)
api_router.include_router(influence.router)
api_router.include_router(jobs.router)
api_router.include_router(applications.router)
api_router.include_router(quality.router)

__all__ = ["api_router", "health"]
