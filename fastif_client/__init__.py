"""A Python client of the FastIF service's HTTP API (httpx; typed with the api_schemas models).

    from fastif_client import FastIFClient

    with FastIFClient() as fastif:  # FASTIF_URL, FASTIF_API_KEY
        model = fastif.register_model({"name": "reviews", "model_path": "model",
                                       "train_data": {"path": "reviews.jsonl"}})
        job = fastif.submit_influence({"model_id": model.id, "inputs": [{"text": "The kettle leaks."}]})
        fastif.wait_for_job(job.id, on_progress=print)
        for item in fastif.iter_results(job.id, item_type=ResultItem):  # api_schemas.ResultItem
            ...

AsyncFastIFClient has the same methods as coroutines. Every error answer of the service
(problem+json) is raised as a FastIFError subclass carrying its `type`, `status`, `title`,
`detail` and `errors`.
"""

from ._core import DEFAULT_URL, JOB_KINDS, ClientSettings, PollSchedule, item_model, retry_after_seconds
from .async_client import AsyncFastIFClient
from .client import FastIFClient
from .errors import (
    BadRequest,
    Conflict,
    FastIFClientError,
    FastIFError,
    Invalid,
    JobCancelled,
    JobFailed,
    MethodNotAllowed,
    ModelBuildFailed,
    NotCancellable,
    NotFound,
    NotReady,
    QueueFull,
    RateLimited,
    ServerError,
    ServiceUnreachable,
    TooLarge,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)

__all__ = [
    "AsyncFastIFClient",
    "BadRequest",
    "ClientSettings",
    "Conflict",
    "DEFAULT_URL",
    "FastIFClient",
    "FastIFClientError",
    "FastIFError",
    "Invalid",
    "JOB_KINDS",
    "JobCancelled",
    "JobFailed",
    "MethodNotAllowed",
    "ModelBuildFailed",
    "NotCancellable",
    "NotFound",
    "NotReady",
    "PollSchedule",
    "QueueFull",
    "RateLimited",
    "ServerError",
    "ServiceUnreachable",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "item_model",
    "retry_after_seconds",
]
