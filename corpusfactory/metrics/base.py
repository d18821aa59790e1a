"""``ComponentMetrics``: one component's registry, its ``component_info`` series, the
helpers that declare its series, and the consumer-lag collectors it watches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from corpusfactory.metrics.constants import BATCH_BUCKETS, PREFIX, STAGE_BUCKETS, VERSION
from corpusfactory.metrics.lag import LagCollector

if TYPE_CHECKING:
    from corpusfactory.settings import Settings


class ComponentMetrics:
    """The registry of one component, with its ``component_info`` series."""

    component = ""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lags: list[LagCollector] = []
        info = Gauge(
            f"{PREFIX}_component_info",
            "Which corpusfactory component this is (1).",
            ["component", "version"],
            registry=self.registry,
        )
        info.labels(self.component, VERSION).set(1)

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", doc, list(labels), registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, list(labels), registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", doc, list(labels), buckets=tuple(buckets), registry=self.registry
        )

    def _stages(self) -> Histogram:
        return self._histogram(
            "stage_seconds", "Seconds per turn in each pipeline stage.", STAGE_BUCKETS, ["stage"]
        )

    def _batches(self) -> Histogram:
        return self._histogram("batch_size", "Items per batch.", BATCH_BUCKETS, ["stage"])

    def render(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry)

    def watch_lag(
        self, settings: Settings, bootstrap: str, group: str, topics: Iterable[str]
    ) -> LagCollector:
        """Export ``group``'s consumer lag on ``topics``; stopped by ``close``."""
        lag = LagCollector(settings, bootstrap, group, topics)
        self.registry.register(lag)
        self._lags.append(lag)
        return lag

    def close(self) -> None:
        """Stop what reads in the background (the lag collectors)."""
        for lag in self._lags:
            lag.close()
