"""Redis-side state shared by the API and the workers: settings, keys, job and model
records, heartbeats and the Celery app (imports redis, celery, pydantic, api_schemas only)."""

from .errors import IdempotencyConflict, JobNotCancellable, JobNotFound, ModelNotFound, QueueFull, RecordError
from .jobs import JobStore
from .models import ModelStore
from .settings import Settings, get_settings, settings_from

__all__ = [
    "IdempotencyConflict",
    "JobNotCancellable",
    "JobNotFound",
    "JobStore",
    "ModelNotFound",
    "ModelStore",
    "QueueFull",
    "RecordError",
    "Settings",
    "get_settings",
    "settings_from",
]
