"""The FastAPI application: `create_app(settings)` for tests and embedding, `app` for uvicorn.

Imports nothing heavy (no torch, no engine): the API starts in well under a second.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from records.celery_app import make_celery
from records.connection import make_redis
from records.jobs import JobStore
from records.models import ModelStore
from records.settings import Settings, get_settings

from .api import api_router, health
from .body_limit import BodySizeLimitMiddleware
from .errors import install_error_handlers
from .metrics import Metrics, MetricsMiddleware
from .ui import router as ui_router


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Release the app's connections at shutdown."""
    yield
    app.state.redis.close()
    app.state.celery.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own Redis client, stores, Celery client and metrics registry."""
    settings = settings or get_settings()
    app = FastAPI(
        title="FastIF",
        summary="Which training examples made a text classifier predict what it predicted",
        version="0.1.0",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    # Created here, not at import: each app gets its own pool (redis-py reconnects by itself).
    app.state.redis = make_redis(settings.effective_redis_url)
    app.state.jobs = JobStore(app.state.redis, result_ttl_s=settings.result_ttl_s)
    app.state.models = ModelStore(app.state.redis)
    app.state.celery = make_celery(settings)
    app.state.metrics = Metrics(app.state.jobs)

    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(api_router)
    app.include_router(ui_router)  # the page is public; its API calls carry the user's key
    # Added last = outermost: metrics also see the 413s of the body limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


app = create_app()
