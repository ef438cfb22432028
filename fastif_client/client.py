"""FastIFClient: the FastIF service's HTTP API from Python, synchronously (httpx)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

import httpx
from pydantic import BaseModel

from api_schemas import (CorrectRequest, ExplainRequest, GraphRequest, InfluenceRequest, Job, JobStatus, Model,
                         ModelCreate, QualityRequest, ResultsPage, SelfInfluenceRequest)

from . import _calls as calls
from ._calls import Answer, Call
from ._core import (Attempts, ClientBase, Paging, Polling, PollSchedule, ProgressCallback, ProgressFeed, Watched,
                    job_has_succeeded, model_is_ready, stream_item)
from .errors import NotFound

Item = TypeVar("Item", bound=BaseModel)


class FastIFClient(ClientBase):
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
        super().__init__(base_url, api_key, timeout, retries, retry_backoff, max_retry_wait, poll)
        self._http = httpx.Client(**self.settings.httpx_options(), transport=transport)

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
        return self._send(calls.create_model(request))

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
        polling = Polling(f"model {model_id}", model_is_ready, timeout, self.poll)
        feed = ProgressFeed(on_progress)

        def fetch() -> Model:
            model = self.get_model(model_id)
            if on_progress is not None and model.build_job_id:
                self._report_build_progress(model.build_job_id, feed)
            return model

        return self._wait(polling, fetch)

    def _report_build_progress(self, build_job_id: str, feed: ProgressFeed) -> None:
        try:
            progress = self.get_job(build_job_id).progress
        except NotFound:
            return  # the build job expired; the model's status still says how the build ended
        feed.report(progress)

    def list_models(self, limit: int = 100) -> list[Model]:
        """GET /v1/models: the registered models, newest first."""
        return self._send(calls.list_models(limit))

    def get_model(self, model_id: str) -> Model:
        """GET /v1/models/{id}."""
        return self._send(calls.get_model(model_id))

    def delete_model(self, model_id: str) -> None:
        """DELETE /v1/models/{id}: forget the model and its caches (a build in progress is cancelled)."""
        self._send(calls.delete_model(model_id))

    # -- starting jobs ---------------------------------------------------------------------------

    def submit(self, kind: str, request: BaseModel | Mapping[str, Any], *, model_id: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Start a job of `kind` (influence, explain, graph, correct, self-influence, quality).

        `request` is the kind's request model (or a mapping checked against it); `model_id` is
        needed by quality jobs only (it is part of their route). The same `idempotency_key` with
        the same request returns the job it started the first time.
        """
        return self._send(calls.submit(kind, request, model_id, idempotency_key))

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
        return self._send(calls.get_job(job_id))

    def list_jobs(self, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        """GET /v1/jobs: recent jobs, newest first, optionally only those in `status`."""
        return self._send(calls.list_jobs(status, limit))

    def cancel_job(self, job_id: str) -> Job:
        """POST /v1/jobs/{id}/cancel: a queued job is cancelled now, a running one stops at its next check.

        Raises NotCancellable when the job has already finished.
        """
        return self._send(calls.cancel_job(job_id))

    def wait_for_job(self, job_id: str, *, timeout: float | None = None,
                     on_progress: ProgressCallback | None = None) -> Job:
        """Poll until the job has succeeded and return it; raises JobFailed, JobCancelled, or
        WaitTimeout after `timeout` seconds (None: no limit).

        Polls back off from `poll.first` to `poll.cap` seconds; `on_progress` gets the job's
        progress {stage, done, total} each time it changes.
        """
        polling = Polling(f"job {job_id}", job_has_succeeded, timeout, self.poll)
        feed = ProgressFeed(on_progress)

        def fetch() -> Job:
            job = self.get_job(job_id)
            feed.report(job.progress)
            return job

        return self._wait(polling, fetch)

    def results_page(self, job_id: str, offset: int = 0, limit: int = 100) -> ResultsPage:
        """GET /v1/jobs/{id}/results: items [offset, offset + limit) of `total`; NotReady until the job succeeded
        (a dataset job's are readable before: those of its finished shards from the first up to the first missing)."""
        return self._send(calls.results_page(job_id, offset, limit))

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
        paging = Paging(page_size, item_type)
        while paging.offset is not None:
            page = self.results_page(job_id, paging.offset, paging.page_size)
            yield from paging.take(page)

    @overload
    def stream_results(self, job_id: str, *, item_type: None = None) -> Iterator[dict[str, Any]]: ...

    @overload
    def stream_results(self, job_id: str, *, item_type: type[Item]) -> Iterator[Item]: ...

    def stream_results(self, job_id: str, *, item_type: type[BaseModel] | None = None) -> Iterator[Any]:
        """Every result item in input order from GET /v1/jobs/{id}/results.jsonl: one request, read as it arrives.

        The same items as iter_results, without a request per page; NotReady until the job succeeded (a dataset
        job streams before: the items of its shards finished when the stream starts).
        """
        path = calls.results_stream_path(job_id)
        attempts = Attempts(self.settings, "GET", path)
        while True:
            with attempts.sending(), self._http.stream("GET", path) as response:
                if response.is_success:
                    for line in response.iter_lines():
                        if line:
                            yield stream_item(line, item_type)
                    return
                response.read()
                wait = attempts.wait_or_raise(response)
            time.sleep(wait)

    # -- HTTP ------------------------------------------------------------------------------------

    def _send(self, call: Call[Answer]) -> Answer:
        """Send `call`, retrying 429 and 503 answers as ClientSettings says; raise every other error answer."""
        attempts = Attempts(self.settings, call.method, call.path)
        while True:
            with attempts.sending():
                response = self._http.request(call.method, call.path, params=call.params, json=call.json,
                                              headers=call.headers)
            if response.is_success:
                return call.read(response)
            time.sleep(attempts.wait_or_raise(response))

    def _wait(self, polling: Polling[Watched], fetch: Callable[[], Watched]) -> Watched:
        """Fetch the job or model until `polling` says the wait is over, sleeping between polls."""
        while True:
            last = fetch()
            if polling.finished(last):
                return last
            time.sleep(polling.next_delay(last))
