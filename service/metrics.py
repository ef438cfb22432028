"""Prometheus metrics of one app: HTTP traffic by route template, and job and worker
gauges read from Redis at scrape time (so every API replica reports the same truth)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from records.heartbeat import alive_workers
from records.jobs import JobStore

from .http_middleware import HTTPMiddleware

# Requests that matched no route share one label, so random URLs cannot explode cardinality.
UNMATCHED = "<unmatched>"


class StateCollector(Collector):
    """Gauges computed from Redis on each scrape: jobs by status, live workers, Redis up."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fastif_redis_up", "1 when Redis answered this scrape")
        try:
            counts = self.jobs.count_by_status()
            workers = len(alive_workers(self.jobs.redis))
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_status = GaugeMetricFamily("fastif_jobs", "Job records by status", labels=["status"])
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status
        alive = GaugeMetricFamily("fastif_workers_alive", "Workers with a live heartbeat")
        alive.add_metric([], workers)
        yield alive


class Metrics:
    """The registry of one app and its HTTP instruments."""

    def __init__(self, jobs: JobStore) -> None:
        # One registry per app: several apps in one process (tests) must not collide.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fastif_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        # Counted where the key is checked (service/api/deps.py): requests that came with a valid key, by its name.
        self.requests_by_key = Counter(
            "fastif_http_requests_by_key", "HTTP requests with a valid API key, by the key's name", ["key"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fastif_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(StateCollector(jobs))


class MetricsMiddleware(HTTPMiddleware):
    """Pure ASGI middleware that counts and times every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500  # if the app raises before answering, ServerErrorMiddleware sends a 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The router stores the matched route in the (shared) scope.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
