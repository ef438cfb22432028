"""What the sync and the async client share: settings, routes of the job kinds, retries, paging and polling.

Nothing here does I/O, so both clients run the same decisions and differ only in how they wait.
The requests themselves, method by method, are in _calls.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from api_schemas import (
    CorrectionReport,
    CorrectRequest,
    ExplainItem,
    ExplainRequest,
    GraphRequest,
    GraphResult,
    InfluenceRequest,
    Progress,
    QualityReport,
    QualityRequest,
    ResultItem,
    SelfInfluenceInputItem,
    SelfInfluenceItem,
    SelfInfluenceRequest,
)

from .errors import JobCancelled, JobFailed, ModelBuildFailed, ServiceUnreachable, WaitTimeout, error_for_response

if TYPE_CHECKING:
    from api_schemas import Job, Model, ResultsPage

DEFAULT_URL = "http://127.0.0.1:8000"  # where `fastif serve` and `fastif standalone` listen by default
URL_ENV, API_KEY_ENV = "FASTIF_URL", "FASTIF_API_KEY"
API_KEY_HEADER = "X-API-Key"  # service/api/deps.py
USER_AGENT = "fastif-client/0.1.0"

# Statuses whose answer says the request was not acted on, so that sending it again is safe
# for every method: 429 (queue full: no job was recorded) and 503 (Redis or the queue down: a
# job that was recorded is marked failed, never run).
RETRY_STATUSES = frozenset({429, 503})

ProgressCallback = Callable[[Progress], Any]


@dataclass(frozen=True)
class ClientSettings:
    """Everything a client is built with; resolved once, never changed afterwards.

    `timeout`: seconds per HTTP request (connect, read, write, pool). `retries`: how many times
    an answer of 429 or 503 is retried before it is raised. A Retry-After is honoured when it is
    at most `max_retry_wait` seconds, and a longer one is raised at once rather than cut short;
    without one the wait is `retry_backoff` × 2^attempt, at most `max_retry_wait`.
    """

    base_url: str
    api_key: str | None = field(repr=False)  # kept out of logs and tracebacks
    timeout: float
    retries: int
    retry_backoff: float
    max_retry_wait: float

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, timeout: float, retries: int,
                retry_backoff: float, max_retry_wait: float) -> ClientSettings:
        """Arguments first, then FASTIF_URL / FASTIF_API_KEY, then the local default URL."""
        url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the FastIF URL must start with http:// or https://, not {url!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if retries < 0 or retry_backoff < 0 or max_retry_wait < 0:
            raise ValueError("retries, retry_backoff and max_retry_wait must not be negative")
        return cls(url.rstrip("/"), key, float(timeout), int(retries), float(retry_backoff), float(max_retry_wait))

    def httpx_options(self) -> dict[str, Any]:
        """What httpx.Client and httpx.AsyncClient are built with (all but the transport)."""
        return {"base_url": self.base_url, "headers": self.headers(), "timeout": self.timeout}

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/problem+json"}
        if self.api_key:
            headers[API_KEY_HEADER] = self.api_key
        return headers

    def retry_wait(self, response: httpx.Response, retries_done: int, now: float | None = None) -> float | None:
        """Seconds to wait before sending the request again, or None to raise this answer."""
        if response.status_code not in RETRY_STATUSES or retries_done >= self.retries:
            return None
        told = retry_after_seconds(response.headers.get("Retry-After"), now)
        if told is None:
            return min(self.max_retry_wait, self.retry_backoff * 2 ** retries_done)
        return told if told <= self.max_retry_wait else None


class Attempts:
    """The sending of one request, again after each answer of 429 or 503, as ClientSettings allows."""

    def __init__(self, settings: ClientSettings, method: str, path: str) -> None:
        self.settings, self.method, self.path = settings, method, path
        self.retries_done = 0

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Raises a failure to get any answer inside the block (httpx.TransportError) as ServiceUnreachable."""
        try:
            yield
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.method, f"{self.settings.base_url}{self.path}", exc) from exc

    def wait_or_raise(self, response: httpx.Response) -> float:
        """Seconds to wait before sending again after the error answer `response`, or raise it as its FastIFError."""
        wait = self.settings.retry_wait(response, self.retries_done)
        if wait is None:
            raise error_for_response(response, retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                                     attempts=self.retries_done + 1)
        self.retries_done += 1
        return wait


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP-date, RFC 9110 §10.2.3) in seconds from `now`."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unreadable: as if there were none
    if when.tzinfo is None:
        return None  # HTTP-dates are GMT; one without a zone is not an HTTP-date
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# -- the job kinds ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobKind:
    """A kind of job: the route that starts it, its request model and its result item's model."""

    name: str  # as Job.kind spells it
    route: str  # `{model_id}` is filled in for the quality job
    request: type[BaseModel]
    item: type[BaseModel]


JOB_KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("influence", "/v1/influence", InfluenceRequest, ResultItem),
    JobKind("explain", "/v1/explain", ExplainRequest, ExplainItem),
    JobKind("graph", "/v1/graph", GraphRequest, GraphResult),
    JobKind("correct", "/v1/correct", CorrectRequest, CorrectionReport),
    JobKind("self_influence", "/v1/self-influence", SelfInfluenceRequest, SelfInfluenceItem),
    JobKind("quality", "/v1/models/{model_id}/quality", QualityRequest, QualityReport),
)}


def job_kind(name: str) -> JobKind:
    """The kind named as Job.kind does (`self_influence`) or as its route does (`self-influence`)."""
    kind = JOB_KINDS.get(name.replace("-", "_"))
    if kind is None:
        raise ValueError(f"unknown job kind {name!r}; one of {', '.join(sorted(JOB_KINDS))}")
    return kind


def job_route(kind: JobKind, model_id: str | None) -> str:
    if "{model_id}" not in kind.route:
        return kind.route
    if not model_id:
        raise ValueError(f"a {kind.name} job needs model_id (it is part of the route {kind.route})")
    return kind.route.format(model_id=segment(model_id))


def segment(value: str) -> str:
    """`value` as one path segment: an id holding `/` or `..` cannot reach another route."""
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} is not an id")
    return quote(value, safe="")


def request_body(model: type[BaseModel], request: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of `request`, checked against `model` here so that a typo fails before it is sent.

    Only the fields the caller set are sent, and those the model's validators resolved from them
    (the same values the service resolves); the service fills in the other defaults itself.
    """
    if isinstance(request, Mapping):
        request = model.model_validate(dict(request))
    elif not isinstance(request, model):
        raise TypeError(f"expected a {model.__name__} or a mapping, not {type(request).__name__}")
    return request.model_dump(mode="json", exclude_unset=True)


def item_model(kind: str, *, dataset: bool = False) -> type[BaseModel]:
    """The model of one result item of jobs of `kind` (Job.kind); `dataset` for a dataset job's (Job.inputs_total set),
    whose self-influence items are per input (SelfInfluenceInputItem) rather than a ranking of training examples."""
    if dataset and job_kind(kind).name == "self_influence":
        return SelfInfluenceInputItem
    return job_kind(kind).item


# -- reading results -------------------------------------------------------------------------------

def as_item(item: dict[str, Any], item_type: type[BaseModel] | None) -> Any:
    """A stored result item as it is, or as `item_type`."""
    return item if item_type is None else item_type.model_validate(item)


def stream_item(line: str, item_type: type[BaseModel] | None) -> Any:
    """One line of a JSON Lines results stream as the stored object, or as `item_type`."""
    return as_item(json.loads(line), item_type)


class Paging:
    """A job's results read a page at a time: where the next page begins (`offset`, None after the
    last page) and its items, as the stored objects or as `item_type`."""

    def __init__(self, page_size: int, item_type: type[BaseModel] | None) -> None:
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000 (the service's page limit)")
        self.page_size, self.item_type = page_size, item_type
        self.offset: int | None = 0

    def take(self, page: ResultsPage) -> Iterator[Any]:
        """The items of `page` (the page that began at `offset`), each read when it is asked for.

        Moves `offset` past them first, to None when `page` was the last.
        """
        assert self.offset is not None, "there is no page after the last"
        offset = self.offset + len(page.items)
        self.offset = None if not page.items or offset >= page.total else offset
        return (as_item(item, self.item_type) for item in page.items)


# -- waiting ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PollSchedule:
    """Seconds between polls of a job or model: `first`, growing by `factor` per poll, at most `cap`."""

    first: float = 0.2
    factor: float = 1.5
    cap: float = 5.0

    def __post_init__(self) -> None:
        if self.first <= 0 or self.factor < 1 or self.cap < self.first:
            raise ValueError("a poll schedule needs first > 0, factor >= 1 and cap >= first")

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(self.cap, delay * self.factor)


Watched = TypeVar("Watched", "Job", "Model")


def model_is_ready(model: Model) -> bool:
    """Whether a wait for `model` is over; raises ModelBuildFailed when its build failed."""
    if model.status == "failed":
        raise ModelBuildFailed(model)
    return model.status == "ready"


def job_has_succeeded(job: Job) -> bool:
    """Whether a wait for `job` is over; raises JobFailed or JobCancelled when it ended otherwise."""
    if job.status == "failed":
        raise JobFailed(job)
    if job.status == "cancelled":
        raise JobCancelled(job)
    return job.status == "succeeded"


class Polling(Generic[Watched]):
    """One wait for a job or a model: when it is over (`finished`), and how long to sleep between polls."""

    def __init__(self, what: str, finished: Callable[[Watched], bool], timeout: float | None,
                 schedule: PollSchedule) -> None:
        self.what, self.finished = what, finished
        self.deadline = Deadline(timeout)
        self.delays = schedule.delays()

    def next_delay(self, last: Watched) -> float:
        """Seconds to sleep before the next poll; raises WaitTimeout, with `last` as last seen, past the timeout."""
        if self.deadline.passed():
            raise WaitTimeout(self.what, self.deadline.timeout or 0.0, last)
        return min(next(self.delays), self.deadline.remaining())


class Deadline:
    """An overall timeout (None: none), measured on the monotonic clock."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
        self.timeout = timeout
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        return self.remaining() <= 0


class ProgressFeed:
    """Hands a job's progress to a callback each time it differs from the last one handed over."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last: tuple[str | None, int, int | None] | None = None

    def report(self, progress: Progress) -> Any:
        """The callback's return value (an awaitable, for an async callback), or None when nothing changed."""
        if self.callback is None:
            return None
        key = (progress.stage, progress.done, progress.total)
        if key == self.last:
            return None
        self.last = key
        return self.callback(progress)


# -- the clients ----------------------------------------------------------------------------------

class ClientBase:
    """What FastIFClient and AsyncFastIFClient hold alike: their settings, resolved once, and poll schedule."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, retries: int,
                 retry_backoff: float, max_retry_wait: float, poll: PollSchedule) -> None:
        self.settings = ClientSettings.resolve(base_url, api_key, timeout, retries, retry_backoff, max_retry_wait)
        self.poll = poll

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.base_url!r})"
