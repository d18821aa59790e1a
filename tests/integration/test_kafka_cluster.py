"""Fault scenario 11: a replicated Kafka cluster loses a partition leader under load.

Three KRaft brokers (``EmbeddedCluster``) carry a whole stack: an admitter, a
scorer, the self-chat producer, and a probe that writes candidates straight to
``turns.candidates`` partition 0. The broker leading that partition is SIGKILLed
mid-stream and brought back a little later. Nobody restarts a client: the
producer, the probe and the workers fail over by themselves, every candidate that
Kafka acknowledged is still there and decided, and I1-I4 hold.
"""

from __future__ import annotations

import atexit
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from corpusfactory.contract import ALL_TOPICS, CANDIDATES, encode
from corpusfactory.engines.broker import EmbeddedCluster
from corpusfactory.kafka_clients import ensure_topics, kafka_python_producer_kwargs
from corpusfactory.settings import Settings
from corpusfactory.tools.stack import ProducerProcess, WorkerProcess, stop_all
from tests.conftest import _start_watchdog, _stop_watchdog
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import (
    candidate,
    candidate_ids,
    check_all_invariants,
    decisions_by_turn,
    wait_for,
)

pytestmark = pytest.mark.integration

# Varied Italian sentences for the probe; a number keeps every text distinct.
PROBE_TEXTS = (
    "Domani mattina vado al mercato a comprare la frutta di stagione",
    "Il treno per Firenze parte alle otto dal binario tre",
    "Mia nonna prepara le lasagne ogni domenica per tutta la famiglia",
    "In biblioteca ho trovato un vecchio libro sulla storia di Venezia",
    "Stasera guardiamo un film e ordiniamo una pizza margherita",
    "Il medico mi ha consigliato di camminare mezz'ora al giorno",
)


class _Watchdogs:
    """The session's watchdog (tests/conftest.py) for each running node JVM: if
    pytest dies without its teardown, they stop the JVMs it leaves behind."""

    def __init__(self) -> None:
        self._by_pid: dict[int, subprocess.Popen[bytes]] = {}

    def watch(self, cluster: EmbeddedCluster) -> None:
        for pid in cluster.pids().values():
            if pid is not None and pid not in self._by_pid:
                self._by_pid[pid] = _start_watchdog(pid)

    def release(self, pid: int) -> None:
        """Retire the watchdog of a JVM that is gone (on a live one it would stop it)."""
        watchdog = self._by_pid.pop(pid, None)
        if watchdog is not None:
            _stop_watchdog(watchdog)

    def close(self) -> None:
        for pid in list(self._by_pid):
            self.release(pid)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[EmbeddedCluster, _Watchdogs]]:
    cluster = EmbeddedCluster(tmp_path / "cluster")
    watchdogs = _Watchdogs()
    # Teardown runs on Ctrl-C too; atexit covers an interpreter exit that skips it.
    atexit.register(cluster.stop)
    try:
        started = time.monotonic()
        cluster.start(timeout=180)
        print(f"\n3-node cluster started in {time.monotonic() - started:.1f}s")
        watchdogs.watch(cluster)
        yield cluster, watchdogs
    finally:
        cluster.stop()
        watchdogs.close()
        atexit.unregister(cluster.stop)


def _describe(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], dict[str, Any]] | None:
    """(topic, partition) -> its metadata (leader_id, replica_nodes, isr_nodes), or None
    while the broker asked cannot tell: it is the one down, or it has not yet learnt
    of a topic created through another broker."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="cluster-test")
    except KafkaError:
        return None
    try:
        infos = admin.describe_topics(topics)
    except KafkaError:
        return None
    finally:
        admin.close()
    if any(info["error_code"] != 0 or not info["partitions"] for info in infos):
        return None
    return {(i["name"], p["partition_index"]): p for i in infos for p in i["partitions"]}


def _min_isr(bootstrap: str, topics: list[str]) -> dict[str, str] | None:
    """Topic -> its min.insync.replicas, or None while some broker cannot tell."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="cluster-test")
    except KafkaError:
        return None
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        configs = admin.describe_configs(resources)["topic"]
    except KafkaError:
        return None
    finally:
        admin.close()
    found = {t: configs.get(t, {}).get("min.insync.replicas", {}).get("value") for t in topics}
    return None if None in found.values() else found


def _leader_other_than(bootstrap: str, topic: str, partition: int, node: int) -> int | None:
    parts = _describe(bootstrap, [topic])
    leader = -1 if parts is None else parts[(topic, partition)]["leader_id"]
    return None if leader in (node, -1) else leader


def _all_in_sync(bootstrap: str, topics: list[str]) -> bool:
    parts = _describe(bootstrap, topics)
    return parts is not None and all(len(p["isr_nodes"]) == 3 for p in parts.values())


def _or_none(fn: Any, *args: Any) -> Any:
    """fn(*args), or None while Kafka cannot answer it (a broker is down)."""
    try:
        return fn(*args)
    except KafkaError:
        return None


def _self_chat_decisions(bootstrap: str, settings: Settings) -> int:
    """Decisions on the self-chat producer's turns (not the probe's)."""
    decided = decisions_by_turn(bootstrap, settings)
    return sum(len(ds) for turn_id, ds in decided.items() if not turn_id.startswith("probe-"))


def _decided_probes(bootstrap: str, settings: Settings, turn_ids: list[str]) -> set[str]:
    """Those of ``turn_ids`` that have a decision (none while Kafka cannot tell)."""
    decided = _or_none(decisions_by_turn, bootstrap, settings) or {}
    return set(turn_ids) & set(decided)


class _Probe(threading.Thread):
    """Writes one candidate every ``every`` seconds to one partition, each with acks=all
    and idempotence, and remembers which ones Kafka acknowledged, and when."""

    def __init__(self, settings: Settings, bootstrap: str, partition: int, every: float) -> None:
        super().__init__(name="probe", daemon=True)
        self.settings = settings
        self.bootstrap = bootstrap
        self.partition = partition
        self.every = every
        self.acked: list[tuple[float, str]] = []  # (monotonic time of the ack, turn id)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        kafka = self.settings.kafka
        producer = KafkaProducer(**kafka_python_producer_kwargs(kafka, self.bootstrap))
        run = uuid.uuid4().hex[:6]
        try:
            n = 0
            while not self._halt.is_set():
                conv = f"probe-{run}-{n}"
                text = f"{PROBE_TEXTS[n % len(PROBE_TEXTS)]}, e questa è la prova {n}."
                cand = candidate(conv, 0, text)
                future = producer.send(
                    self.settings.topic(CANDIDATES),
                    key=conv.encode(),
                    value=encode(cand),
                    partition=self.partition,
                )
                future.get(timeout=120)  # retried by the client through the failover
                self.acked.append((time.monotonic(), cand.turn_id))
                n += 1
                self._halt.wait(self.every)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            producer.close(timeout=30)

    def finish(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=180)

    def acked_since(self, moment: float) -> list[str]:
        """The turn ids Kafka acknowledged after ``moment``."""
        return [turn_id for at, turn_id in list(self.acked) if at > moment]


def test_partition_leader_killed_under_load(tmp_path, cluster, built_models, embedder) -> None:
    cluster_handle, watchdogs = cluster
    bootstrap = cluster_handle.bootstrap
    assert bootstrap is not None and len(bootstrap.split(",")) == 3
    # Short conversations keep the run modest; the failover happens mid-conversation.
    s = make_settings(
        tmp_path / "state",
        bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        producer={"min_messages": 3, "max_messages": 4, "retry_cap": 2},
    )
    ensure_topics(s, bootstrap)

    # Unset in the settings, replication follows the cluster: 3 replicas, 2 in sync.
    topics = [s.topic(name) for name in ALL_TOPICS]
    parts = wait_for(lambda: _describe(bootstrap, topics), 60, "the topics on every broker")
    assert {len(p["replica_nodes"]) for p in parts.values()} == {3}
    min_isr = wait_for(lambda: _min_isr(bootstrap, topics), 60, "the topics' configs")
    assert set(min_isr.values()) == {"2"}
    cand_topic = s.topic(CANDIDATES)

    admitter = WorkerProcess(s, "admitter").start()
    scorer = WorkerProcess(s, "scorer").start()
    prod = ProducerProcess(s, conversations=3)
    probe = _Probe(s, bootstrap, partition=0, every=0.5)
    began = time.monotonic()
    phases: dict[str, float] = {}
    try:
        admitter.wait_ready()
        scorer.wait_ready()
        phases["workers ready"] = time.monotonic() - began
        prod.start()
        wait_for(lambda: _self_chat_decisions(bootstrap, s) >= 3, 180, "first decisions")
        probe.start()
        wait_for(lambda: len(probe.acked) >= 2, 60, "the probe writing")
        phases["under load"] = time.monotonic() - began

        # Crash the broker leading turns.candidates[0] while both producers write.
        victim = wait_for(
            lambda: _leader_other_than(bootstrap, cand_topic, 0, -1), 60, "the leader"
        )
        assert prod.alive, "the producer finished before the kill: nothing to fail over"
        killed_at = time.monotonic()
        pid = cluster_handle.kill(victim)
        assert pid is not None
        watchdogs.release(pid)

        # The controller hands the partition to a surviving replica; writes to it and
        # decisions go on while the victim is down.
        new_leader = wait_for(
            lambda: _leader_other_than(bootstrap, cand_topic, 0, victim),
            120,
            "a new leader of turns.candidates[0]",
        )
        elected_at = time.monotonic()
        phases["failover"] = elected_at - killed_at
        wait_for(
            lambda: len(_decided_probes(bootstrap, s, probe.acked_since(elected_at))) >= 3,
            180,
            "decisions on probe candidates written to the new leader",
        )
        probe.finish()
        assert not probe.is_alive(), "the probe producer did not finish"
        assert probe.error is None, f"the probe producer failed: {probe.error!r}"

        # The victim comes back with its data, catches up and rejoins every ISR.
        phases["node down"] = time.monotonic() - killed_at
        restart_at = time.monotonic()
        cluster_handle.node(victim).start(timeout=120)
        watchdogs.watch(cluster_handle)
        phases["node restart"] = time.monotonic() - restart_at
        assert prod.wait(timeout=600) == 0, prod.log_text()[-3000:]
        phases["producer done"] = time.monotonic() - began
        wait_for(lambda: _all_in_sync(bootstrap, topics), 120, "every partition back to 3 in sync")
        # Every candidate in the topic is decided before the workers stop.
        wait_for(
            lambda: candidate_ids(bootstrap, s) <= set(decisions_by_turn(bootstrap, s)),
            180,
            "a decision for every candidate",
        )
        phases["all decided"] = time.monotonic() - began
    finally:
        probe.finish()
        stop_all([prod, scorer, admitter])
    print(
        f"\nleader {victim} of {cand_topic}[0] killed, leader {new_leader} after it; "
        f"probe candidates acked: {len(probe.acked)}, "
        f"{len(probe.acked_since(elected_at))} by the new leader; "
        + ", ".join(f"{name} {secs:.1f}s" for name, secs in phases.items())
    )

    # No acknowledged write was lost in the failover: every probe candidate Kafka
    # acknowledged is in the topic (check_all_invariants then has it decided).
    acked = {turn_id for _, turn_id in probe.acked}
    assert acked <= candidate_ids(bootstrap, s)
    check_all_invariants(bootstrap, s, embedder)
