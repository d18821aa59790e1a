"""Faust application assembly for the stream workers.

Two roles, each its own Faust app and consumer group:

* ``scorer`` (``streams.score``): reads ``turns.candidates`` (N partitions),
  dead-letters bad events, embeds and NLL-scores the rest, writes
  ``turns.scored``. Run as many scorer workers as there are partitions to scale.
* ``admitter`` (``streams.admit``): reads ``turns.scored``, which has exactly
  one partition, so one admitter at a time makes every search-and-insert
  decision (invariant I3, reliability.md). It owns the vector index, which
  Milvus Lite requires anyway (one process per database file). Extra admitters
  are hot standbys: Kafka gives the partition to one of them.

Run a worker with ``corpusfactory worker --role scorer|admitter``. Each worker
serves its metrics (``corpusfactory.metrics``, docs/metrics.md) on its role's
``metrics.ports`` port, or ``--metrics-port``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from corpusfactory import contract
from corpusfactory.contract import DeadLetter, encode
from corpusfactory.metrics import AdmitterMetrics, ScorerMetrics
from corpusfactory.settings import Settings
from streams.faust_app import ReliableFaustApp, faust_broker_kwargs

log = logging.getLogger(__name__)

ROLES = ("scorer", "admitter")


class StreamContext:
    """What an agent needs: settings, topics, and one inference thread."""

    def __init__(
        self, app: faust.App, settings: Settings, metrics: ScorerMetrics | AdmitterMetrics
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        # One thread: inference is serial per worker, and never on the event loop.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

        def topic(name: str, partitions: int | None = None) -> Any:
            return app.topic(
                settings.topic(name),
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=partitions,
                internal=False,
            )

        self.candidates = topic(contract.CANDIDATES)
        self.scored = topic(contract.SCORED, 1)
        self.decisions = topic(contract.DECISIONS)
        self.deadletter = topic(contract.DEADLETTER)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def forward(self, topic: Any, event: Any, record: Any, stage: str) -> bool:
        """Send ``record`` to ``topic`` under its event's key; a record that does not
        encode is dead-lettered at ``stage`` instead. True when it was sent."""
        try:
            value = encode(record)
        except Exception as exc:
            await self.dead_letter(event, exc, stage)
            return False
        await topic.send(key=event.message.key, value=value)
        return True

    async def dead_letter(
        self,
        event: Any,
        error: BaseException | str,
        stage: str,
        origin: tuple[str, int, int] | None = None,
        value: bytes | None = None,
    ) -> None:
        """Send an event that cannot be processed to turns.deadletter, with its origin.

        ``origin`` and ``value`` name the candidate a scored turn came from (topic,
        partition, offset and its bytes), so the admitter's dead letters point at
        what a producer sent; by default they are the event's own.
        """
        msg = event.message
        topic, partition, offset = origin or (msg.topic, msg.partition, msg.offset)
        record: DeadLetter = contract.dead_letter(
            topic=topic,
            partition=partition,
            offset=offset,
            key=msg.key,
            value=msg.value if value is None else value,
            error=error,
            stage=stage,
        )
        log.warning(
            "dead-lettered %s[%d]@%d (%s): %s",
            topic,
            partition,
            offset,
            stage,
            record.error[:300],
        )
        self.metrics.deadletter.labels(stage).inc()
        await self.deadletter.send(key=msg.key, value=encode(record))


def role_metrics(settings: Settings, role: str) -> ScorerMetrics | AdmitterMetrics:
    """The metrics object of a worker role."""
    if role == "scorer":
        return ScorerMetrics()
    return AdmitterMetrics(settings.metrics.acceptance_window)


def app_id_for(settings: Settings, role: str) -> str:
    """The Faust app id of a role, which is also its Kafka consumer group."""
    return f"{settings.kafka.topic_prefix}{settings.worker.app_id}-{role}"


def create_app(
    settings: Settings,
    role: str,
    bootstrap: str,
    metrics: ScorerMetrics | AdmitterMetrics | None = None,
) -> faust.App:
    """A Faust app for one role, with its agent registered."""
    ctx = create_context(settings, role, bootstrap, metrics)
    if role == "scorer":
        from streams.score import register

        register(ctx)
    else:
        from streams.admit import register

        register(ctx)
    return ctx.app


def create_context(
    settings: Settings,
    role: str,
    bootstrap: str,
    metrics: ScorerMetrics | AdmitterMetrics | None = None,
) -> StreamContext:
    """The Faust app of one role and its StreamContext, no agent registered yet.

    ``create_app`` registers the role's agent on it; the plumbing tests register it
    themselves, after pointing the context's output topics at in-memory channels.
    """
    if role not in ROLES:
        raise ValueError(f"unknown worker role {role!r}; choose one of {ROLES}")
    if metrics is None:
        metrics = role_metrics(settings, role)
    app_id = app_id_for(settings, role)
    datadir = settings.state_path / "faust" / role
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = ReliableFaustApp(  # acks=all (producer_acks=-1) and idempotence
        app_id,
        **faust_broker_kwargs(settings.kafka, bootstrap),
        store="memory://",
        web_enabled=False,
        topic_allow_declare=False,  # topics are created by ensure_topics with our partitioning
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=50,
        broker_commit_interval=1.0,
        # A worker killed without leaving its group (kill -9, a lost machine) holds
        # its partitions until the session times out: 10 s instead of faust's 60 s.
        broker_session_timeout=settings.worker.session_timeout_s,
        broker_heartbeat_interval=settings.worker.heartbeat_interval_s,
        producer_acks=-1,
        stream_buffer_maxsize=1024,  # back-pressure: bounded in-memory buffer per partition
        autodiscover=False,
        datadir=str(datadir),
    )
    return StreamContext(app, settings, metrics)


def worker_lag(settings: Settings, role: str) -> tuple[str, list[str]]:
    """(consumer group, topics) whose lag a worker of ``role`` exports."""
    source = contract.CANDIDATES if role == "scorer" else contract.SCORED
    return app_id_for(settings, role), [settings.topic(source)]


def run_worker(
    settings: Settings,
    role: str,
    bootstrap: str,
    metrics: ScorerMetrics | AdmitterMetrics,
    loglevel: str = "INFO",
) -> None:
    """Build the app of ``role`` and run it until SIGTERM/SIGINT (the command line has
    found Kafka, created the topics and serves the metrics: ``cli.common.run_service``)."""
    if settings.worker.torch_threads:
        import torch

        torch.set_num_threads(settings.worker.torch_threads)
    app = create_app(settings, role, bootstrap, metrics)
    worker = BoundedShutdownWorker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.shutdown_deadline_s = settings.worker.shutdown_timeout_s
    worker.execute_from_commandline()


class BoundedShutdownWorker(faust.Worker):
    """A faust worker that stops within ``shutdown_deadline_s`` of SIGTERM/SIGINT.

    A clean stop is tried first. A worker blocked in an engine call (an index that
    does not answer, a wedged batch) would otherwise never exit: the inference
    thread is joined at interpreter exit. After the deadline the process exits
    anyway; nothing is lost, since offsets are only committed after decisions
    were sent (as after a kill -9).
    """

    shutdown_deadline_s: float = 10.0
    _deadline_started = False

    def _start_deadline(self, why: str) -> None:
        if self._deadline_started:
            return
        self._deadline_started = True
        deadline = self.shutdown_deadline_s

        def expire() -> None:
            time.sleep(deadline)
            log.error("%s: not stopped after %.0fs; exiting now", why, deadline)
            logging.shutdown()
            os._exit(143 if why == "SIGTERM" else 130)

        threading.Thread(target=expire, name="shutdown-deadline", daemon=True).start()

    def _on_sigterm(self) -> None:
        self._start_deadline("SIGTERM")
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._start_deadline("SIGINT")
        super()._on_sigint()
