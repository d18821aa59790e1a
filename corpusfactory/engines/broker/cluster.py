"""A replicated Kafka cluster of several embedded KRaft nodes on loopback, for fault tests.

``EmbeddedCluster`` runs ``size`` nodes (3 by default), each broker and controller,
under ``<state_dir>/kafka-cluster/``; ``ClusterNode`` is one of them, laid out as a
single ``EmbeddedBroker``; ``ClusterLayout`` is what they agree on (``cluster.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import write_text_atomic
from corpusfactory.engines.broker.config import (
    BASE_JVM_OPTS,
    random_cluster_id,
    server_properties,
)
from corpusfactory.engines.broker.node import EmbeddedBroker
from corpusfactory.engines.broker.probe import brokers_known
from corpusfactory.engines.broker.processes import (
    HOST,
    file_lock,
    free_ports,
    loopback_address,
    send_signal,
)
from corpusfactory.errors import BrokerError
from corpusfactory.kafka_clients import majority_of

CLUSTER_SIZE = 3
# Appended to BASE_JVM_OPTS for cluster nodes (later options win): three JVMs share
# the machine, so each gets a smaller heap and only the quick C1 JIT, which spares
# the CPU that C2 compile threads would take from the workers while they start.
CLUSTER_JVM_OPTS = ("-Xms32m", "-Xmx256m", "-XX:TieredStopAtLevel=1")


@dataclasses.dataclass(frozen=True)
class ClusterLayout:
    """What every node of a cluster must agree on, fixed at its first start."""

    cluster_id: str
    ports: dict[int, tuple[int, int]]  # node id -> (client port, controller port)

    @property
    def voters(self) -> str:
        """``controller.quorum.voters``: every node is a controller."""
        return ",".join(f"{n}@{HOST}:{c}" for n, (_, c) in sorted(self.ports.items()))

    @property
    def bootstrap(self) -> str:
        return ",".join(loopback_address(p) for _, (p, _) in sorted(self.ports.items()))

    @property
    def internal_replicas(self) -> int:
        return min(3, len(self.ports))


class ClusterNode(EmbeddedBroker):
    """One node of an ``EmbeddedCluster``, broker and controller at once. Its files are
    laid out as a single broker's, under ``<cluster home>/node-<id>/kafka/``; ``start``
    (re)starts this node alone, ``kill`` crashes it."""

    def __init__(self, cluster_home: Path, node_id: int, layout: ClusterLayout) -> None:
        port, controller_port = layout.ports[node_id]
        super().__init__(cluster_home / f"node-{node_id}", port, controller_port)
        self.node_id = node_id
        self.layout = layout

    def _properties(self, port: int, controller_port: int) -> str:
        replicas = self.layout.internal_replicas
        return server_properties(
            self.data_dir,
            port,
            controller_port,
            node_id=self.node_id,
            voters=self.layout.voters,
            replicas=replicas,
            min_isr=majority_of(replicas),
        )

    def _cluster_id(self) -> str:
        # Every node's storage carries the same id, or the nodes refuse each other.
        return self.layout.cluster_id

    def _jvm_opts(self) -> tuple[str, ...]:
        return (*BASE_JVM_OPTS, *CLUSTER_JVM_OPTS)


class EmbeddedCluster:
    """A replicated Kafka cluster on loopback: ``size`` KRaft nodes (3 by default),
    each broker and controller, under ``<state_dir>/kafka-cluster/``.

    ``cluster.json`` holds the cluster id and every node's ports, chosen at the first
    start and kept, so a restarted node (or the whole cluster) comes back at the same
    addresses with the same data. Internal topics get min(3, size) replicas and a
    majority of them as ``min.insync.replicas``.
    """

    def __init__(self, state_dir: Path | str, size: int = CLUSTER_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.home = self.state_dir / "kafka-cluster"
        self.layout_path = self.home / "cluster.json"
        self.size = size

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(range(1, self.size + 1))

    @property
    def bootstrap(self) -> str | None:
        """``127.0.0.1:P1,127.0.0.1:P2,...`` once the ports were chosen, else None."""
        layout = self._stored_layout()
        return layout.bootstrap if layout else None

    def node(self, node_id: int) -> ClusterNode:
        """A handle on one node (the cluster must have been started once)."""
        layout = self._stored_layout()
        if layout is None:
            raise BrokerError(f"the Kafka cluster in {self.home} was never started")
        if node_id not in layout.ports:
            raise BrokerError(f"the Kafka cluster has no node {node_id} (nodes: {self.node_ids})")
        return ClusterNode(self.home, node_id, layout)

    def nodes(self) -> list[ClusterNode]:
        layout = self._stored_layout()
        return [] if layout is None else [ClusterNode(self.home, n, layout) for n in self.node_ids]

    def start(self, timeout: float = 120.0) -> str:
        """Start every node that is not running and return the bootstrap servers once
        all of them serve clients."""
        self.home.mkdir(parents=True, exist_ok=True)
        with file_lock(self.home / ".lock"), contextlib.ExitStack() as locks:
            layout = self._stored_layout() or self._new_layout()
            nodes = [ClusterNode(self.home, n, layout) for n in self.node_ids]
            for node in nodes:  # always in node order, so two starts cannot deadlock
                node.home.mkdir(parents=True, exist_ok=True)
                locks.enter_context(file_lock(node.home / ".lock"))
            spawned: list[tuple[ClusterNode, int]] = []
            try:
                # Every node is launched before any is awaited: a node serves clients
                # only once a majority of the controllers has elected a leader.
                waits = []
                for node in nodes:
                    pid = node._broker_pid()
                    if pid is None:
                        pid = node._spawn()[0]
                        spawned.append((node, pid))
                    waits.append((node, pid))
                deadline = time.monotonic() + timeout
                for node, pid in waits:
                    port = layout.ports[node.node_id][0]
                    node._wait_ready(pid, port, max(1.0, deadline - time.monotonic()))
                self._await_membership(layout, deadline)
            except BaseException:
                # Never leave a half-started cluster behind (also on Ctrl-C).
                for _node, pid in spawned:
                    send_signal(pid, signal.SIGTERM)
                for node, pid in spawned:
                    node._terminate(pid, timeout=10.0)
                    node.pid_path.unlink(missing_ok=True)
                raise
            return layout.bootstrap

    def _await_membership(self, layout: ClusterLayout, deadline: float) -> None:
        # Each node serving clients is not yet enough: its metadata may not list the
        # others for a moment, and a client asking it would see a smaller cluster
        # (and, say, create topics with fewer replicas).
        for node_id, (port, _) in sorted(layout.ports.items()):
            while (known := brokers_known(port)) < self.size:
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"node {node_id} of the Kafka cluster knows {known} of "
                        f"{self.size} brokers; see the logs under {self.home}"
                    )
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node: SIGTERM to all at once (the last one standing would wait for
        a controller quorum that is gone), then SIGKILL what is left after ``timeout``."""
        nodes = [n for n in self.nodes() if n.home.is_dir()]
        with contextlib.ExitStack() as locks:
            for node in nodes:
                locks.enter_context(file_lock(node.home / ".lock"))
            pids = [(node, node._broker_pid()) for node in nodes]
            for _, pid in pids:
                if pid is not None:
                    send_signal(pid, signal.SIGTERM)
            for node, pid in pids:
                if pid is not None:
                    node._terminate(pid, timeout)
                node.pid_path.unlink(missing_ok=True)

    def kill(self, node_id: int) -> int | None:
        """SIGKILL one node's JVM; returns its pid (None if it was not running)."""
        return self.node(node_id).kill()

    def pids(self) -> dict[int, int | None]:
        """Node id -> pid of its running JVM, or None."""
        return {node.node_id: node._broker_pid() for node in self.nodes()}

    def is_running(self) -> bool:
        """True when every node is alive and answers Kafka requests."""
        nodes = self.nodes()
        return bool(nodes) and all(node.is_running() for node in nodes)

    def status(self) -> dict[str, Any]:
        return {
            "running": self.is_running(),
            "bootstrap": self.bootstrap,
            "nodes": {node.node_id: node.status() for node in self.nodes()},
        }

    # ---- layout

    def _stored_layout(self) -> ClusterLayout | None:
        try:
            data = json.loads(self.layout_path.read_text(encoding="utf-8"))
            ports = {
                int(n): (int(p["port"]), int(p["controller_port"]))
                for n, p in data["nodes"].items()
            }
            layout = ClusterLayout(str(data["cluster_id"]), ports)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if sorted(layout.ports) != list(self.node_ids):
            raise BrokerError(
                f"the Kafka cluster in {self.home} has nodes {sorted(layout.ports)}, "
                f"not {list(self.node_ids)}: delete {self.home} to make a new one"
            )
        return layout

    def _new_layout(self) -> ClusterLayout:
        free = free_ports(2 * self.size)  # all at once, so they are distinct
        ports = {n: (free[2 * i], free[2 * i + 1]) for i, n in enumerate(self.node_ids)}
        layout = ClusterLayout(random_cluster_id(), ports)
        nodes = {str(n): {"port": p, "controller_port": c} for n, (p, c) in layout.ports.items()}
        payload = {"cluster_id": layout.cluster_id, "nodes": nodes}
        write_text_atomic(self.layout_path, json.dumps(payload, indent=1) + "\n")
        return layout
