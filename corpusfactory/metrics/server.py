"""The /metrics endpoint: ``serve_metrics`` starts prometheus-client's HTTP server on a
component's port, ``metrics_endpoint`` serves it for a ``with`` block."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import start_http_server

from corpusfactory.errors import ConfigError
from corpusfactory.metrics.base import ComponentMetrics
from corpusfactory.metrics.constants import COMPONENTS

if TYPE_CHECKING:
    from corpusfactory.settings import Settings

log = logging.getLogger(__name__)


class MetricsServer:
    """A running /metrics endpoint (prometheus-client's HTTP server in a daemon thread)."""

    def __init__(self, httpd: Any, thread: threading.Thread, host: str, port: int) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    settings: Settings,
    component: str,
    metrics: ComponentMetrics,
    port: int | None = None,
) -> MetricsServer | None:
    """Serve ``metrics`` on ``metrics.host`` and the component's port; None when disabled.

    ``port`` (``--metrics-port``) overrides ``metrics.ports.<component>``; 0 turns
    the endpoint off. A port already in use is a ``ConfigError`` that says how to
    pick another, since two scorers on one machine need two ports.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")
    m = settings.metrics
    chosen = getattr(m.ports, component) if port is None else port
    if not m.enabled or chosen == 0:
        return None
    try:
        httpd, thread = start_http_server(chosen, addr=m.host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            [
                f"metrics: cannot serve {component} metrics on {m.host}:{chosen} ({exc.strerror}); "
                f"choose another with --metrics-port or metrics.ports.{component}, "
                "or 0 to turn the endpoint off"
            ]
        ) from None
    actual = int(httpd.server_address[1])
    log.info("%s metrics on http://%s:%d/metrics", component, m.host, actual)
    return MetricsServer(httpd, thread, m.host, actual)


@contextlib.contextmanager
def metrics_endpoint(
    settings: Settings, component: str, metrics: ComponentMetrics, port: int | None = None
) -> Iterator[MetricsServer | None]:
    """``serve_metrics`` for the ``with`` block; the endpoint and ``metrics`` (its lag
    readers) are closed at its end."""
    try:
        server = serve_metrics(settings, component, metrics, port)
        try:
            yield server
        finally:
            if server is not None:
                server.close()
    finally:
        metrics.close()
