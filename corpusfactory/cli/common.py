"""What the command modules of :mod:`corpusfactory.cli` share: the ``--metrics-port``
flag and :func:`run_service`, the one start-up sequence of a long-running component.

Every service command (worker, produce, corpus write, train, evaluate, build) starts
the same way: find Kafka (the configured cluster, else the embedded broker), create
the contract topics that are missing, export the component's consumer lag, serve
its ``/metrics``, say it is ready, and stop on SIGTERM/SIGINT. ``run_service`` does
that in that order; the command builds its component inside the block::

    with run_service(s, "trainer", metrics, args.metrics_port) as svc:
        with Trainer(s, svc.bootstrap, metrics) as trainer:
            svc.watch_lag(trainer.group_id, [s.topic(ACCEPTED)])
            svc.ready()
            trainer.run(svc.stop_event())
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from corpusfactory.engines.broker import resolve_bootstrap
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.metrics import ComponentMetrics, metrics_endpoint
from corpusfactory.settings import Settings


def metrics_port_flag(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` of a long-running command (docs/metrics.md)."""
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics on this port while running (default: metrics.ports.<component>; "
        "0 = off)",
    )


def stop_on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT (the handlers replace the defaults)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@dataclass
class Service:
    """A running component's Kafka address, metrics and stop signal."""

    settings: Settings
    component: str
    bootstrap: str
    metrics: ComponentMetrics
    _stop: threading.Event | None = field(default=None, repr=False)

    def watch_lag(self, group: str, topics: Sequence[str]) -> None:
        """Export the consumer lag of ``group`` on ``topics`` (``consumer_lag``)."""
        self.metrics.watch_lag(self.settings, self.bootstrap, group, list(topics))

    def ready(self) -> None:
        """The line the process stack and the tests wait for: ``<component> ready``."""
        print(f"{self.component} ready", flush=True)

    def stop_event(self) -> threading.Event:
        """Set on SIGTERM/SIGINT (the handlers are installed on the first call)."""
        if self._stop is None:
            self._stop = stop_on_signals()
        return self._stop


@contextlib.contextmanager
def run_service(
    settings: Settings,
    component: str,
    metrics: ComponentMetrics,
    metrics_port: int | None,
    *,
    start_embedded: bool = False,
    lag: tuple[str, Sequence[str]] | None = None,
) -> Iterator[Service]:
    """Bootstrap, topics, lag (``lag``: group and topics, when known up front), then
    ``/metrics`` on ``metrics_port`` (None: the settings' port for ``component``; 0:
    off) for as long as the block runs.

    ``start_embedded`` lets a component start the embedded broker when no cluster is
    configured and none runs (the demo's workers and producer); the others need one
    running and say so."""
    bootstrap = resolve_bootstrap(settings, start_embedded=start_embedded)
    ensure_topics(settings, bootstrap)
    service = Service(settings, component, bootstrap, metrics)
    if lag is not None:
        service.watch_lag(*lag)
    with metrics_endpoint(settings, component, metrics, metrics_port):
        yield service
