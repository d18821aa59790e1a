"""Prometheus metrics of the factory's long-running components.

Each component owns one metrics object (``ScorerMetrics``, ``AdmitterMetrics``,
``ProducerMetrics``, ``WriterMetrics``, ``TrainerMetrics``, ``EvaluatorMetrics``,
``BuilderMetrics``) on a registry of its own, so a process exports only the
series of what it runs and two components in one process (tests, the demo) never
collide. The services always record into their object; whether it is served is
the caller's choice::

    metrics = ScorerMetrics()
    server = serve_metrics(settings, "scorer", metrics)   # None when disabled

Names, labels and ports are the contract in ``docs/metrics.md``; the rejection
reasons are ``corpusfactory.contract.Reason``, exported from start-up at 0 so
that a reason that never happened reads as a rate of 0, not as missing data.
Consumer lag (``LagCollector``) is read from Kafka by a daemon thread every
``metrics.lag_cache_s`` seconds, never on a component's event loop; a scrape only
reads the last figures.

The modules: ``constants`` (series prefix, components, histogram buckets), ``base``
(``ComponentMetrics``), ``components`` (one class per component), ``lag``
(``LagCollector``), ``server`` (``serve_metrics``, ``metrics_endpoint``).
"""

from __future__ import annotations

from corpusfactory.metrics.base import ComponentMetrics
from corpusfactory.metrics.components import (
    AdmitterMetrics,
    BuilderMetrics,
    EvaluatorMetrics,
    ProducerMetrics,
    ScorerMetrics,
    TrainerMetrics,
    WriterMetrics,
)
from corpusfactory.metrics.constants import (
    BATCH_BUCKETS,
    COMPONENTS,
    COSINE_BUCKETS,
    JUDGE_BUCKETS,
    NLL_BUCKETS,
    PREFIX,
    STAGE_BUCKETS,
    VERSION,
)
from corpusfactory.metrics.lag import LagCollector
from corpusfactory.metrics.server import MetricsServer, metrics_endpoint, serve_metrics

__all__ = [
    "BATCH_BUCKETS",
    "COMPONENTS",
    "COSINE_BUCKETS",
    "JUDGE_BUCKETS",
    "NLL_BUCKETS",
    "PREFIX",
    "STAGE_BUCKETS",
    "VERSION",
    "AdmitterMetrics",
    "BuilderMetrics",
    "ComponentMetrics",
    "EvaluatorMetrics",
    "LagCollector",
    "MetricsServer",
    "ProducerMetrics",
    "ScorerMetrics",
    "TrainerMetrics",
    "WriterMetrics",
    "metrics_endpoint",
    "serve_metrics",
]
