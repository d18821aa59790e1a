"""The Prometheus /metrics endpoints of the long-running components."""

from __future__ import annotations

from pydantic import Field

from corpusfactory.settings.base import _Section


class MetricsPorts(_Section):
    """The port of each component's /metrics endpoint (docs/metrics.md)."""

    scorer: int = Field(9401, ge=0, le=65535)
    admitter: int = Field(9402, ge=0, le=65535)
    producer: int = Field(9403, ge=0, le=65535)
    writer: int = Field(9404, ge=0, le=65535)
    trainer: int = Field(9405, ge=0, le=65535)
    evaluator: int = Field(9406, ge=0, le=65535)
    builder: int = Field(9407, ge=0, le=65535)


class MetricsSettings(_Section):
    """Prometheus metrics of the long-running components (``corpusfactory.metrics``)."""

    enabled: bool = Field(True, description="Serve /metrics in every long-running component.")
    host: str = Field(
        "127.0.0.1", description="Bind address; 0.0.0.0 in containers, so Prometheus reaches it."
    )
    ports: MetricsPorts = MetricsPorts()
    lag_cache_s: float = Field(
        5.0, ge=0.0, description="Consumer lag is read from Kafka at most this often."
    )
    acceptance_window: int = Field(
        500, ge=1, description="First decisions the acceptance-rate gauge looks back over."
    )
