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
Consumer lag is read from Kafka when Prometheus scrapes (``LagCollector``), in
the HTTP server's thread, never on a component's event loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from corpusfactory import contract
from corpusfactory.errors import ConfigError

if TYPE_CHECKING:
    from corpusfactory.contract import Decision, ScoredTurn
    from corpusfactory.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "corpusfactory"
COMPONENTS = ("scorer", "admitter", "producer", "writer", "trainer", "evaluator", "builder")
VERSION = "0.1.0"

# Per-turn stage times span a millisecond (admission) to tens of seconds (generation
# of a 7B model on a busy GPU, a round trip behind a backlog).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The paper's filter keeps NLL < 2 (an Italian BERT, modes about 0.8-1.0); the demo's
# tiny scorer sits near 6: fine steps below 4, coarser ones up to 12.
NLL_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4, 5, 6, 7, 8, 10, 12)
# Cosine: the reject line is 0.9 (contamination too), so 0.05 steps at the top.
COSINE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
JUDGE_BUCKETS = (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)


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


class ScorerMetrics(ComponentMetrics):
    component = "scorer"

    def __init__(self) -> None:
        super().__init__()
        self.stage = self._stages()
        self.batch = self._batches()
        self.deadletter = self._counter(
            "deadletter", "Events sent to the dead-letter topic.", ["stage"]
        )
        for stage in ("decode", "score"):
            self.deadletter.labels(stage)

    def observe_batch(self, scored: Sequence[ScoredTurn]) -> None:
        self.batch.labels("score").observe(len(scored))
        for s in scored:
            for stage, seconds in (s.stage_s or {}).items():
                self.stage.labels(stage).observe(seconds)


class AdmitterMetrics(ComponentMetrics):
    component = "admitter"

    def __init__(self, acceptance_window: int = 500) -> None:
        super().__init__()
        self.decisions = self._counter(
            "decisions", "First decisions of turns, by reason.", ["reason"]
        )
        for reason in contract.Reason:
            self.decisions.labels(reason)
        self.replayed = self._counter(
            "decisions_replayed", "Decisions repeated for turns decided before."
        )
        self.acceptance = self._gauge(
            "acceptance_rate", "Accepted share of the most recent first decisions."
        )
        self._window: deque[bool] = deque(maxlen=acceptance_window)
        self.nll = self._histogram(
            "nll", "MLM NLL of decided, scored turns.", NLL_BUCKETS, ["source", "accepted"]
        )
        self.cosine = self._histogram(
            "neighbour_cosine",
            "Cosine with the nearest stored vector of decided, searched turns.",
            COSINE_BUCKETS,
        )
        self.judge = self._histogram(
            "judge_score", "LLM-judge scores of judged turns.", JUDGE_BUCKETS
        )
        self.stage = self._stages()
        self.batch = self._batches()
        self.index_vectors = self._gauge("index_vectors", "Vectors in the index.", ["kind"])
        self.deadletter = self._counter(
            "deadletter", "Events sent to the dead-letter topic.", ["stage"]
        )
        for stage in ("admit", "conflict"):  # conflict: a turn id decided for another text
            self.deadletter.labels(stage)
        self.retries = self._counter(
            "index_retries", "Tries of the vector index that found it unavailable."
        )

    def observe(self, decisions: Sequence[Decision]) -> None:
        """Count a batch of decisions (replays apart) and its distributions."""
        if decisions:
            self.batch.labels("admit").observe(len(decisions))
        for d in decisions:
            self.stage.labels("admit").observe((d.stage_s or {}).get("admit", 0.0))
            if d.replayed:
                self.replayed.inc()
                continue
            self.decisions.labels(d.reason).inc()
            self._window.append(d.accepted)
            if d.tokens > 0 and math.isfinite(d.nll) and d.nll >= 0:
                self.nll.labels(d.source or "unknown", "true" if d.accepted else "false").observe(
                    d.nll
                )
            if d.neighbour_id:
                self.cosine.observe(d.similarity)
            if d.judge_score is not None:
                self.judge.observe(d.judge_score)
        if self._window:
            self.acceptance.set(sum(self._window) / len(self._window))

    def set_index_counts(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.index_vectors.labels(kind).set(n)


class ProducerMetrics(ComponentMetrics):
    component = "producer"

    def __init__(self) -> None:
        super().__init__()
        self.generated = self._counter(
            "candidates_generated", "Candidate turns generated and sent.", ["producer", "model"]
        )
        self.empty = self._counter(
            "generations_empty", "Generations with no usable text.", ["producer"]
        )
        self.resent = self._counter(
            "candidates_resent", "Candidates sent again under the same turn id.", ["producer"]
        )
        self.conversations = self._counter(
            "conversations", "Conversations closed, by status.", ["producer", "status"]
        )
        self.active = self._gauge(
            "conversations_active", "Conversations in progress.", ["producer"]
        )
        self.stage = self._stages()
        self.batch = self._batches()

    def start(self, producer: str, model: str) -> None:
        """Export every series of this producer from the start, at 0."""
        self.generated.labels(producer, model)
        self.empty.labels(producer)
        self.resent.labels(producer)
        for status in ("finished", "truncated"):
            self.conversations.labels(producer, status)
        self.active.labels(producer).set(0)


class WriterMetrics(ComponentMetrics):
    component = "writer"

    def __init__(self) -> None:
        super().__init__()
        self.conversations = self._gauge(
            "corpus_conversations", "Conversations in the corpus store.", ["source", "truncated"]
        )
        self.messages = self._gauge("corpus_messages", "Messages in the corpus store.")
        self.decisions = self._gauge("corpus_decisions", "Decision records in the store.")
        self.undecodable = self._counter(
            "undecodable", "Events the corpus writer could not decode."
        )

    def set_counts(
        self, by_source: dict[tuple[str, bool], int], messages: int, decisions: int
    ) -> None:
        for (source, truncated), n in by_source.items():
            self.conversations.labels(source, "true" if truncated else "false").set(n)
        self.messages.set(messages)
        self.decisions.set(decisions)


class TrainerMetrics(ComponentMetrics):
    component = "trainer"

    def __init__(self) -> None:
        super().__init__()
        self.snapshots = self._counter("snapshots", "Snapshots published by this process.")
        self.loss = self._gauge(
            "snapshot_loss", "Training loss of each snapshot.", ["snapshot", "point"]
        )
        self.tokens_per_s = self._gauge(
            "snapshot_tokens_per_second", "Training tokens/s of each snapshot.", ["snapshot"]
        )
        self.conversations = self._gauge(
            "snapshot_conversations", "Conversations each snapshot trained on.", ["snapshot"]
        )
        self.pending = self._gauge(
            "training_pending_conversations", "Conversations waiting for the trigger."
        )
        self.failures = self._counter("training_failures", "Training runs that failed.")

    def observe_snapshot(self, manifest: dict[str, Any]) -> None:
        sid = str(manifest["id"])
        for point in ("first", "final"):
            value = manifest.get(f"{point}_loss")
            if value is not None:
                self.loss.labels(sid, point).set(float(value))
        if manifest.get("tokens_per_s") is not None:
            self.tokens_per_s.labels(sid).set(float(manifest["tokens_per_s"]))
        self.conversations.labels(sid).set(int(manifest.get("conversations", 0)))


class EvaluatorMetrics(ComponentMetrics):
    component = "evaluator"

    def __init__(self) -> None:
        super().__init__()
        self.score = self._gauge(
            "evaluation_score", "Evaluation figures per model.", ["model", "task", "metric"]
        )
        self.evaluations = self._counter("evaluations", "Models evaluated by this process.")
        self.finished = self._gauge(
            "evaluation_timestamp_seconds", "When a model's evaluation finished.", ["model"]
        )
        self.failures = self._counter(
            "evaluation_failures",
            "Evaluation tasks that failed (recorded, skipped until retried by hand).",
            ["task"],
        )

    def observe(self, model: str, results: dict[str, Any], counted: bool = True) -> None:
        """Every finite number in ``results`` (task -> figures), as task/metric series;
        ``counted=False`` for results stored by an earlier run."""
        for task, figures in results.items():
            if not isinstance(figures, dict):
                continue
            for metric, value in figures.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if math.isfinite(value):
                    self.score.labels(model, task, metric).set(float(value))
        if counted:
            self.evaluations.inc()
            self.finished.labels(model).set(time.time())


class BuilderMetrics(ComponentMetrics):
    component = "builder"
    FIGURES = ("kl_mean", "kl_p99", "top1_agreement", "ppl_delta_pct")
    FAILURE_REASONS = ("convert", "quantize", "gate")

    def __init__(self) -> None:
        super().__init__()
        self.gate = self._gauge(
            "build_gate", "Quality-gate figures of each build.", ["snapshot", "quant", "figure"]
        )
        self.passed = self._gauge(
            "build_gate_passed",
            "1 when the build is within its gate budgets.",
            ["snapshot", "quant"],
        )
        self.size = self._gauge("build_size_bytes", "GGUF file size.", ["snapshot", "quant"])
        self.builds = self._counter("builds", "Builds made by this process.", ["result"])
        for result in ("published", "held_back"):
            self.builds.labels(result)
        self.failures = self._counter(
            "build_failures",
            "Snapshots whose builds failed (recorded, skipped until retried by hand), "
            "by the step that failed.",
            ["reason"],
        )
        for reason in self.FAILURE_REASONS:
            self.failures.labels(reason)

    def observe_build(self, described: dict[str, Any], counted: bool = True) -> None:
        """One build as ``Build.describe()`` gives it."""
        snap, quant = str(described["snapshot"]), str(described["quant"])
        gate = described.get("gate") or {}
        for figure in self.FIGURES:
            value = gate.get(figure)
            if isinstance(value, int | float) and math.isfinite(value):
                self.gate.labels(snap, quant, figure).set(float(value))
        published = bool(described.get("published"))
        self.passed.labels(snap, quant).set(1 if published else 0)
        self.size.labels(snap, quant).set(int(described.get("size_bytes", 0)))
        if counted:
            self.builds.labels("published" if published else "held_back").inc()


class LagCollector(Collector):
    """``corpusfactory_consumer_lag{group,topic}``: end offsets minus committed offsets.

    A daemon thread reads them from Kafka every ``metrics.lag_cache_s`` seconds
    (from the first scrape on, or ``start()``); a scrape only reads the last
    figures, so it never waits on Kafka (a scrape blocked on a broker that is down
    would time out and mark the whole component down). A partition without a
    committed offset counts from its start. Figures older than ``STALE_S`` (Kafka
    unreachable since) are left out: Prometheus shows a gap, not a stale number.
    """

    STALE_S = 60.0

    def __init__(
        self, settings: Settings, bootstrap: str, group: str, topics: Iterable[str]
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.group = group
        self.topics = list(topics)
        self.every_s = max(settings.metrics.lag_cache_s, 0.5)
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._at = -math.inf
        self._lag: dict[str, int] = {}
        self._admin: Any = None
        self._consumer: Any = None

    def _read(self) -> dict[str, int]:
        from kafka import KafkaAdminClient, TopicPartition

        from corpusfactory.kafka_clients import consumer, kafka_python_kwargs

        kafka = self.settings.kafka
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **kafka_python_kwargs(kafka, self.bootstrap), client_id=f"{self.group}-lag"
            )
            self._consumer = consumer(kafka, self.bootstrap, group_id=None)
        # kafka-python 3: {group: {TopicPartition: OffsetAndMetadata}}; a group that
        # never committed has no entry.
        committed = self._admin.list_group_offsets([self.group]).get(self.group) or {}
        lag: dict[str, int] = {}
        for topic in self.topics:
            parts = self._consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            if not tps:
                continue
            ends = self._consumer.end_offsets(tps)
            begins = self._consumer.beginning_offsets(tps)
            total = 0
            for tp in tps:
                meta = committed.get(tp)
                pos = meta.offset if meta is not None and meta.offset >= 0 else begins[tp]
                total += max(0, ends[tp] - pos)
            lag[topic] = total
        return lag

    def refresh(self) -> bool:
        """Read the lag now (blocking); False when Kafka could not be read."""
        with self._io:  # the thread and a caller never share the clients at once
            try:
                lag = self._read()
            except Exception as exc:  # Kafka down or restarting: a gap, logged
                log.warning("consumer lag of %s unavailable: %s", self.group, exc)
                self._close_clients()
                return False
        with self._lock:
            self._lag, self._at = lag, time.monotonic()
        return True

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"lag-{self.group}", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.every_s)
        with self._io:
            self._close_clients()

    def collect(self) -> Iterator[Metric]:
        self.start()
        family = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag",
            "Messages behind the end of the topic, for the component's consumer group.",
            labels=["group", "topic"],
        )
        with self._lock:
            if time.monotonic() - self._at <= self.STALE_S:
                for topic, n in self._lag.items():
                    family.add_metric([self.group, topic], n)
        yield family

    def _close_clients(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                try:
                    client.close()
                except Exception as exc:  # closing a broken connection: nothing to keep
                    log.debug("closing a lag client: %s", exc)
        self._admin = self._consumer = None

    def close(self) -> None:
        """Stop the reading thread and close the Kafka clients."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            # A read stuck on an unreachable broker is not waited for: the daemon
            # thread closes its clients itself when the read gives up.
            thread.join(timeout=5)
            if thread.is_alive():
                return
        with self._io:
            self._close_clients()


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
