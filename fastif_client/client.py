"""FastIFClient: the FastIF service's HTTP API from Python, synchronously (httpx)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

import httpx
from pydantic import BaseModel

from api_schemas import (
    CorrectRequest,
    ExplainRequest,
    GraphRequest,
    InfluenceRequest,
    Job,
    JobList,
    JobStatus,
    Model,
    ModelCreate,
    ModelList,
    QualityRequest,
    ResultsPage,
    SelfInfluenceRequest,
)

from ._core import (
    ClientSettings,
    Deadline,
    PollSchedule,
    ProgressCallback,
    ProgressFeed,
    job_kind,
    job_route,
    request_body,
    segment,
    stream_item,
    wait_or_raise,
)
from .errors import (
    JobCancelled,
    JobFailed,
    ModelBuildFailed,
    NotFound,
    ServiceUnreachable,
    WaitTimeout,
)

Item = TypeVar("Item", bound=BaseModel)


class FastIFClient:
    """A client of one FastIF service; every method is one call (or one wait) against its API.

    Built complete: `base_url` (else FASTIF_URL, else http://127.0.0.1:8000), `api_key` (else
    FASTIF_API_KEY; sent as X-API-Key), `timeout` seconds per HTTP request, and `retries` of a
    429 or 503 answer, each after its Retry-After (see ClientSettings). `poll` spaces the polls
    of the wait methods. `transport` replaces the network (an httpx.MockTransport, a WSGI app).
    Use it as a context manager, or call close().
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, retry_backoff: float = 0.5, max_retry_wait: float = 60.0,
                 poll: PollSchedule = PollSchedule(), transport: httpx.BaseTransport | None = None) -> None:
        self.settings = ClientSettings.resolve(base_url, api_key, timeout, retries, retry_backoff, max_retry_wait)
        self.poll = poll
        self._http = httpx.Client(base_url=self.settings.base_url, headers=self.settings.headers(),
                                  timeout=self.settings.timeout, transport=transport)

    def __repr__(self) -> str:
        return f"FastIFClient({self.settings.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FastIFClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- models ----------------------------------------------------------------------------------

    def create_model(self, request: ModelCreate | Mapping[str, Any]) -> Model:
        """POST /v1/models: register a model directory and its training data; answers at once (`building`)."""
        return Model.model_validate(self._request("POST", "/v1/models", json=request_body(ModelCreate, request)).json())

    def register_model(self, request: ModelCreate | Mapping[str, Any], *, wait: bool = True,
                       timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Model:
        """Register a model and, with `wait`, return it once ready (see wait_for_model)."""
        model = self.create_model(request)
        if not wait:
            return model
        return self.wait_for_model(model.id, timeout=timeout, on_progress=on_progress)

    def wait_for_model(self, model_id: str, *, timeout: float | None = None,
                       on_progress: ProgressCallback | None = None) -> Model:
        """Poll until the model is `ready`; raises ModelBuildFailed, or WaitTimeout after `timeout` seconds.

        `on_progress` gets the build job's progress each time it changes.
        """
        deadline, feed = Deadline(timeout), ProgressFeed(on_progress)
        for delay in self.poll.delays():
            model = self.get_model(model_id)
            if on_progress is not None and model.build_job_id:
                self._report_build_progress(model.build_job_id, feed)
            if model.status == "ready":
                return model
            if model.status == "failed":
                raise ModelBuildFailed(model)
            if deadline.passed():
                raise WaitTimeout(f"model {model_id}", timeout or 0.0, model)
            time.sleep(min(delay, deadline.remaining()))
        raise AssertionError("unreachable: the poll schedule is endless")

    def _report_build_progress(self, build_job_id: str, feed: ProgressFeed) -> None:
        try:
            progress = self.get_job(build_job_id).progress
        except NotFound:
            return  # the build job expired; the model's status still says how the build ended
        feed.report(progress)

    def list_models(self, limit: int = 100) -> list[Model]:
        """GET /v1/models: the registered models, newest first."""
        return ModelList.model_validate(self._request("GET", "/v1/models", params={"limit": limit}).json()).items

    def get_model(self, model_id: str) -> Model:
        """GET /v1/models/{id}."""
        return Model.model_validate(self._request("GET", f"/v1/models/{segment(model_id)}").json())

    def delete_model(self, model_id: str) -> None:
        """DELETE /v1/models/{id}: forget the model and its caches (a build in progress is cancelled)."""
        self._request("DELETE", f"/v1/models/{segment(model_id)}")

    # -- starting jobs ---------------------------------------------------------------------------

    def submit(self, kind: str, request: BaseModel | Mapping[str, Any], *, model_id: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Start a job of `kind` (influence, explain, graph, correct, self-influence, quality).

        `request` is the kind's request model (or a mapping checked against it); `model_id` is
        needed by quality jobs only (it is part of their route). The same `idempotency_key` with
        the same request returns the job it started the first time.
        """
        spec = job_kind(kind)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        response = self._request("POST", job_route(spec, model_id), json=request_body(spec.request, request),
                                 headers=headers)
        return Job.model_validate(response.json())

    def submit_influence(self, request: InfluenceRequest | Mapping[str, Any], *,
                         idempotency_key: str | None = None) -> Job:
        """POST /v1/influence."""
        return self.submit("influence", request, idempotency_key=idempotency_key)

    def submit_explain(self, request: ExplainRequest | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """POST /v1/explain."""
        return self.submit("explain", request, idempotency_key=idempotency_key)

    def submit_graph(self, request: GraphRequest | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """POST /v1/graph."""
        return self.submit("graph", request, idempotency_key=idempotency_key)

    def submit_correct(self, request: CorrectRequest | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """POST /v1/correct."""
        return self.submit("correct", request, idempotency_key=idempotency_key)

    def submit_self_influence(self, request: SelfInfluenceRequest | Mapping[str, Any], *,
                              idempotency_key: str | None = None) -> Job:
        """POST /v1/self-influence."""
        return self.submit("self_influence", request, idempotency_key=idempotency_key)

    def submit_quality(self, model_id: str, request: QualityRequest | Mapping[str, Any], *,
                       idempotency_key: str | None = None) -> Job:
        """POST /v1/models/{model_id}/quality."""
        return self.submit("quality", request, model_id=model_id, idempotency_key=idempotency_key)

    # -- following jobs --------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        """GET /v1/jobs/{id}: status, progress, times, error."""
        return Job.model_validate(self._request("GET", f"/v1/jobs/{segment(job_id)}").json())

    def list_jobs(self, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        """GET /v1/jobs: recent jobs, newest first, optionally only those in `status`."""
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        return JobList.model_validate(self._request("GET", "/v1/jobs", params=params).json()).items

    def cancel_job(self, job_id: str) -> Job:
        """POST /v1/jobs/{id}/cancel: a queued job is cancelled now, a running one stops at its next check.

        Raises NotCancellable when the job has already finished.
        """
        return Job.model_validate(self._request("POST", f"/v1/jobs/{segment(job_id)}/cancel").json())

    def wait_for_job(self, job_id: str, *, timeout: float | None = None,
                     on_progress: ProgressCallback | None = None) -> Job:
        """Poll until the job has succeeded and return it; raises JobFailed, JobCancelled, or
        WaitTimeout after `timeout` seconds (None: no limit).

        Polls back off from `poll.first` to `poll.cap` seconds; `on_progress` gets the job's
        progress {stage, done, total} each time it changes.
        """
        deadline, feed = Deadline(timeout), ProgressFeed(on_progress)
        for delay in self.poll.delays():
            job = self.get_job(job_id)
            feed.report(job.progress)
            if job.status == "succeeded":
                return job
            if job.status == "failed":
                raise JobFailed(job)
            if job.status == "cancelled":
                raise JobCancelled(job)
            if deadline.passed():
                raise WaitTimeout(f"job {job_id}", timeout or 0.0, job)
            time.sleep(min(delay, deadline.remaining()))
        raise AssertionError("unreachable: the poll schedule is endless")

    def results_page(self, job_id: str, offset: int = 0, limit: int = 100) -> ResultsPage:
        """GET /v1/jobs/{id}/results: items [offset, offset + limit) of `total`; NotReady until the job succeeded."""
        response = self._request("GET", f"/v1/jobs/{segment(job_id)}/results", params={"offset": offset, "limit": limit})
        return ResultsPage.model_validate(response.json())

    @overload
    def iter_results(self, job_id: str, *, page_size: int = 100, item_type: None = None) -> Iterator[dict[str, Any]]: ...

    @overload
    def iter_results(self, job_id: str, *, page_size: int = 100, item_type: type[Item]) -> Iterator[Item]: ...

    def iter_results(self, job_id: str, *, page_size: int = 100,
                     item_type: type[BaseModel] | None = None) -> Iterator[Any]:
        """Every result item in input order, a page of `page_size` at a time.

        Items are the stored JSON objects, or `item_type` instances (ResultItem, ExplainItem, ...;
        fastif_client.item_model(job.kind) names the one of a kind).
        """
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000 (the service's page limit)")
        offset = 0
        while True:
            page = self.results_page(job_id, offset, page_size)
            for item in page.items:
                yield item if item_type is None else item_type.model_validate(item)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    @overload
    def stream_results(self, job_id: str, *, item_type: None = None) -> Iterator[dict[str, Any]]: ...

    @overload
    def stream_results(self, job_id: str, *, item_type: type[Item]) -> Iterator[Item]: ...

    def stream_results(self, job_id: str, *, item_type: type[BaseModel] | None = None) -> Iterator[Any]:
        """Every result item in input order from GET /v1/jobs/{id}/results.jsonl: one request, read as it arrives.

        The same items as iter_results, without a request per page; NotReady until the job succeeded.
        """
        path = f"/v1/jobs/{segment(job_id)}/results.jsonl"
        retries_done = 0
        while True:
            try:
                with self._http.stream("GET", path) as response:
                    if response.is_success:
                        for line in response.iter_lines():
                            if line:
                                yield stream_item(line, item_type)
                        return
                    response.read()
                    wait = wait_or_raise(self.settings, response, retries_done)
            except httpx.TransportError as exc:
                raise ServiceUnreachable("GET", f"{self.settings.base_url}{path}", exc) from exc
            time.sleep(wait)
            retries_done += 1

    # -- HTTP ------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, retrying 429 and 503 answers as ClientSettings says; raise every other error answer."""
        retries_done = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise ServiceUnreachable(method, f"{self.settings.base_url}{path}", exc) from exc
            if response.is_success:
                return response
            wait = wait_or_raise(self.settings, response, retries_done)
            time.sleep(wait)
            retries_done += 1

