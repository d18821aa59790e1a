"""Prometheus metrics of the server, on a registry of its own (one per app).

* ``corpusfactory_serving_requests_total{route,status}`` and
  ``corpusfactory_serving_request_duration_seconds{route}``: every HTTP request,
  refused ones included; a streamed response counts until its last byte. Unknown
  paths share the route label "other" so a scanner cannot grow the label set.
* ``corpusfactory_serving_prompt_tokens_total`` / ``..._generated_tokens_total``.
* ``corpusfactory_serving_model_swaps_total``, ``..._model_info{model_id,backend}``
  and ``..._active_leases``: read from the model registry at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.server.registry import ModelRegistry

PREFIX = "corpusfactory_serving"
# Generations take seconds; API calls milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _RegistryCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        swaps = CounterMetricFamily(f"{PREFIX}_model_swaps", "Times the served model was swapped.")
        swaps.add_metric([], self._models.swap_count)
        yield swaps
        info = GaugeMetricFamily(
            f"{PREFIX}_model_info", "The model being served (1).", labels=["model_id", "backend"]
        )
        if self._models.current_id is not None:
            info.add_metric([self._models.current_id, self._models.current_kind or ""], 1)
        yield info
        yield GaugeMetricFamily(
            f"{PREFIX}_active_leases",
            "Requests holding a model (old models included).",
            value=self._models.active_leases,
        )


class ServerMetrics:
    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to the last byte of the response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Completion tokens generated.", registry=self.registry
        )
        self.registry.register(_RegistryCollector(models))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request (outermost, so refusals are counted too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # what the client sees if the app fails before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
