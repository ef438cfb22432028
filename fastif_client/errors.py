"""What the client raises: every problem+json answer as a typed FastIFError, and the outcomes of waiting.

The service answers every error as RFC 9457 problem+json with a stable `type`
(`https://fastif.dev/problems/<slug>`); `error_for_response` turns such an answer into the
subclass for its slug (or, for a slug this client does not know, for its status), so a caller
can write `except NotFound:` and still read the exact `type`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from api_schemas import FieldError, Problem

if TYPE_CHECKING:
    from api_schemas import ErrorInfo, Job, Model

PROBLEM_BASE = "https://fastif.dev/problems/"


class FastIFClientError(Exception):
    """The root of everything fastif_client raises about the service (a bad request model raises
    pydantic's ValidationError before anything is sent)."""


class ServiceUnreachable(FastIFClientError):
    """No HTTP answer at all: the connection failed or timed out (the httpx error is the cause)."""

    def __init__(self, method: str, url: str, cause: httpx.TransportError) -> None:
        super().__init__(f"{method} {url}: {type(cause).__name__}: {cause or 'no answer'}")
        self.method, self.url = method, url


class FastIFError(FastIFClientError):
    """An error answer of the service: the problem's `type`, `status`, `title`, `detail` and field `errors`.

    `retry_after` is the answer's Retry-After in seconds (None without one); `attempts` is how
    many times the request was sent before this answer was given up on (more than 1 after retries).
    """

    def __init__(self, *, type: str, status: int, title: str, detail: str | None = None,
                 errors: list[FieldError] | None = None, instance: str | None = None,
                 retry_after: float | None = None, attempts: int = 1) -> None:
        self.type, self.status, self.title, self.detail = type, status, title, detail
        self.errors: list[FieldError] = list(errors or [])
        self.instance, self.retry_after, self.attempts = instance, retry_after, attempts
        super().__init__(self.message)

    @property
    def slug(self) -> str:
        """The stable last part of `type` (`model-not-found`), or `type` itself when it is not one of ours."""
        return self.type[len(PROBLEM_BASE):] if self.type.startswith(PROBLEM_BASE) else self.type

    @property
    def message(self) -> str:
        """One line for people: status, title, detail and the first field error's location."""
        text = f"{self.status} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if self.errors and self.errors[0].loc and not self.detail:
            first = self.errors[0]
            text += f": {'.'.join(str(part) for part in first.loc)}: {first.msg}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r}, status={self.status}, detail={self.detail!r})"


class BadRequest(FastIFError):
    """400: malformed JSON or an otherwise unreadable request."""


class Unauthorized(FastIFError):
    """401: the X-API-Key header is missing or not one of the service's keys."""


class NotFound(FastIFError):
    """404: no such model, job, route or picture."""


class MethodNotAllowed(FastIFError):
    """405."""


class Conflict(FastIFError):
    """409: the resource is not in a state that allows the request."""


class NotReady(Conflict):
    """409: the model is still building (model-not-ready), or the job has not succeeded (job-not-finished)."""


class NotCancellable(Conflict):
    """409: the job has already finished."""


class TooLarge(FastIFError):
    """413: too many inputs, a text too long, or a body over the service's limit."""


class Invalid(FastIFError):
    """422: the request fails validation (`errors` says where), names a path outside the data root, a
    missing file, an unknown label, too few training examples, or reuses an Idempotency-Key."""


class RateLimited(FastIFError):
    """429: come back later (`retry_after`)."""


class QueueFull(RateLimited):
    """429 queue-full: the service holds its maximum of queued jobs."""


class ServerError(FastIFError):
    """500 and other 5xx answers but 503."""


class Unavailable(FastIFError):
    """503: Redis or the job queue is unavailable, or no worker is alive (`retry_after`)."""


# Slugs whose class is more specific than their status's.
_SLUG_CLASSES: dict[str, type[FastIFError]] = {
    "model-not-ready": NotReady,
    "job-not-finished": NotReady,
    "job-not-cancellable": NotCancellable,
    "queue-full": QueueFull,
}
_STATUS_CLASSES: dict[int, type[FastIFError]] = {
    400: BadRequest, 401: Unauthorized, 404: NotFound, 405: MethodNotAllowed, 409: Conflict,
    413: TooLarge, 422: Invalid, 429: RateLimited, 503: Unavailable,
}


def error_class(slug: str, status: int) -> type[FastIFError]:
    """The exception class for a problem of `slug` answered with `status`."""
    if slug in _SLUG_CLASSES:
        return _SLUG_CLASSES[slug]
    if status in _STATUS_CLASSES:
        return _STATUS_CLASSES[status]
    return ServerError if status >= 500 else FastIFError


def error_for_response(response: httpx.Response, *, retry_after: float | None = None,
                       attempts: int = 1) -> FastIFError:
    """The typed exception for an error answer (the response body must have been read).

    A problem+json body gives every field; any other body (a proxy's HTML page, say) gives
    `type` `about:blank` (RFC 9457's default), the reason phrase as title and the body's start as detail.
    """
    problem = _problem_of(response)
    if problem is None:
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else None
        problem = Problem(type="about:blank", title=response.reason_phrase or "HTTP error",
                          status=response.status_code, detail=text)
    slug = problem.type[len(PROBLEM_BASE):] if problem.type.startswith(PROBLEM_BASE) else problem.type
    # The status line is what happened; a body that disagrees (it should not) does not override it.
    cls = error_class(slug, response.status_code)
    return cls(type=problem.type, status=response.status_code, title=problem.title, detail=problem.detail,
               errors=problem.errors, instance=problem.instance, retry_after=retry_after, attempts=attempts)


def _problem_of(response: httpx.Response) -> Problem | None:
    try:
        body: Any = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "type" not in body:
        return None
    try:
        return Problem.model_validate({"title": response.reason_phrase or "HTTP error",
                                       "status": response.status_code, **body})
    except ValueError:
        return None


def _failure_reason(error: ErrorInfo | None) -> str:
    """The code and message of a failed job or build, as its exception's message gives them."""
    return f"{error.code}: {error.message}" if error else "no reason recorded"


class JobFailed(FastIFClientError):
    """The job ended `failed`; `job.error` holds the worker's code and message."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} ({job.kind}) failed: {_failure_reason(job.error)}")
        self.job = job


class JobCancelled(FastIFClientError):
    """The job ended `cancelled`."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} ({job.kind}) was cancelled")
        self.job = job


class ModelBuildFailed(FastIFClientError):
    """The model's build ended `failed`; `model.error` says why."""

    def __init__(self, model: Model) -> None:
        super().__init__(f"model {model.id} ({model.name}) failed to build: {_failure_reason(model.error)}")
        self.model = model


class WaitTimeout(FastIFClientError, TimeoutError):
    """A wait ran past its overall timeout; `last` is the job or model as last seen (still unfinished)."""

    def __init__(self, what: str, timeout: float, last: Job | Model) -> None:
        super().__init__(f"{what} was still {last.status} after {timeout:g} s")
        self.last = last
