"""An embedded single-node Apache Kafka broker (KRaft mode) for local runs and tests.

``corpusfactory broker start`` and the test suite run a real Kafka broker rather
than a fake, so the workers are exercised against the same protocol they meet
in production. The broker is the plain ``kafka.Kafka`` main class from Apache
Kafka 3.9.1, acting as both broker and KRaft controller (no ZooKeeper).

* ``ensure_jars`` resolves the broker's classpath once with Maven from
  ``broker/pom.xml`` and caches it outside the checkout, under
  ``$CORPUSFACTORY_CACHE`` (default ``~/.cache/corpusfactory``)
  ``/kafka/<pom hash>/libs``.
* ``EmbeddedBroker`` keeps everything else under ``<state_dir>/kafka/``: the log
  directories, the generated ``server.properties`` and ``log4j.properties``,
  ``broker.pid``, ``broker.log`` and ``ports.json`` (the chosen ports, reused on
  every restart so clients and stored offsets stay valid).

* ``EmbeddedCluster`` runs three such nodes (``size``) as one replicated
  cluster on loopback, for the tests of broker failures (reliability.md,
  scenario 11): every node is broker and controller, ``controller.quorum.voters``
  lists all of them, and one cluster id is formatted into each node's storage.
  Its files live under ``<state_dir>/kafka-cluster/`` (``cluster.json``, then one
  ``node-<id>/kafka/`` per node, laid out as a single broker's).

A broker runs detached in its own session, so it outlives the command that
started it; ``stop`` ends it (``kill`` crashes it, for fault tests). Extra JVM
options can be given in ``CORPUSFACTORY_BROKER_JVM_OPTS`` (e.g. ``-Xmx1g``; later
options win).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corpusfactory.cache import cache_root as default_cache_root
from corpusfactory.errors import BrokerError, JavaMissingError
from corpusfactory.kafka_clients import majority_of
from corpusfactory.settings import Settings

HOST = "127.0.0.1"
POM_PATH = Path(__file__).resolve().parents[2] / "broker" / "pom.xml"
JVM_OPTS_ENV = "CORPUSFACTORY_BROKER_JVM_OPTS"
COMPLETE_MARKER = "COMPLETE"
JAVA_MISSING_MESSAGE = (
    "Java 17+ is needed for the embedded Kafka broker: install a JDK "
    "(e.g. apt-get install openjdk-17-jre-headless) or set KAFKA_BOOTSTRAP_SERVERS "
    "to use an existing cluster"
)

# A small heap and the serial collector keep the broker at a few hundred MB and
# one GC thread, so it fits next to the workers on a 2-core CI machine.
BASE_JVM_OPTS = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
TOOL_JVM_OPTS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

# broker.log is rotated at start once it grows past this, keeping one old copy.
LOG_ROTATE_BYTES = 10 * 1024 * 1024

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Brokers started by this Python process, so their exit can be reaped (a dead
# child stays a zombie, and looks alive to kill(pid, 0), until it is waited for).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- jars


def ensure_jars(cache_root: Path | None = None) -> Path:
    """The directory holding the broker's classpath, downloading it on first use."""
    if not POM_PATH.is_file():
        raise BrokerError(f"the broker build file {POM_PATH} is missing from the checkout")
    pom_bytes = POM_PATH.read_bytes()
    # Keyed by the pom's content, so a version bump gets a fresh classpath.
    digest = hashlib.sha256(pom_bytes).hexdigest()
    base = Path(cache_root or default_cache_root()) / "kafka" / digest[:16]
    libs = base / "libs"
    marker = base / COMPLETE_MARKER
    if marker.is_file() and libs.is_dir():
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with _file_lock(base / ".lock"):
        # Another process may have finished the download while we waited.
        if not (marker.is_file() and libs.is_dir()):
            _download_jars(base, libs)
            # Written last: without it the next call redoes an interrupted download.
            marker.write_text(digest + "\n", encoding="utf-8")
    return libs


def _download_jars(base: Path, libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "Maven (mvn) is needed once to download the Kafka broker jars: install it "
            "(e.g. apt-get install maven) or set KAFKA_BOOTSTRAP_SERVERS to use an existing cluster"
        )
    partial = base / f"libs.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM_PATH),
        "dependency:copy-dependencies", f"-DoutputDirectory={partial}",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerError("mvn took over 30 minutes to download the Kafka broker jars") from exc
    if done.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerError(
            f"mvn could not download the Kafka broker jars (exit {done.returncode}):\n"
            + _tail(done.stdout + done.stderr)
        )
    # Swap in the complete directory in one rename, replacing any leftover.
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)


# --------------------------------------------------------------------------- java


def java_executable() -> str:
    """The java binary: ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found:
        return found
    raise JavaMissingError(JAVA_MISSING_MESSAGE)


def _classpath(libs: Path) -> str:
    # Java expands "dir/*" itself, so no shell is involved.
    return str(libs / "*")


def _extra_jvm_opts() -> list[str]:
    return shlex.split(os.environ.get(JVM_OPTS_ENV, ""))


# --------------------------------------------------------------------------- broker


class EmbeddedBroker:
    """A single-node KRaft Kafka broker whose files live under ``<state_dir>/kafka/``.

    ``port`` and ``controller_port`` of 0 mean: pick free ports the first time and
    remember them in ``ports.json``; non-zero values are used (and remembered) as given.
    """

    def __init__(self, state_dir: Path | str, port: int = 0, controller_port: int = 0) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.home = self.state_dir / "kafka"
        self.data_dir = self.home / "data"
        self.config_path = self.home / "server.properties"
        self.log4j_path = self.home / "log4j.properties"
        self.pid_path = self.home / "broker.pid"
        self.log_path = self.home / "broker.log"
        self.ports_path = self.home / "ports.json"
        self._requested_port = port
        self._requested_controller_port = controller_port

    # ---- public API

    @property
    def bootstrap(self) -> str | None:
        """``127.0.0.1:PORT`` once ports were chosen, else None."""
        ports = self._stored_ports()
        return _address(ports[0]) if ports else None

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker (or find it running) and return its bootstrap address."""
        self.home.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.home / ".lock"):
            pid = self._broker_pid()
            if pid is not None:
                return self._await_existing(pid, timeout)
            pid, port = self._spawn()
            self._await_spawned(pid, port, timeout)
            return _address(port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout`` seconds. No-op if stopped."""
        if not self.home.is_dir():
            return
        with _file_lock(self.home / ".lock"):
            pid = self._broker_pid()
            if pid is not None:
                self._terminate(pid, timeout)
            self.pid_path.unlink(missing_ok=True)

    def kill(self) -> int | None:
        """SIGKILL the broker's JVM, as a crash or a power cut would end it: no clean
        shutdown, no flush. Returns the pid it killed (None if none ran); ``start``
        brings the broker back, recovering its logs from the disk."""
        if not self.home.is_dir():
            return None
        with _file_lock(self.home / ".lock"):
            pid = self._broker_pid()
            if pid is not None:
                _signal(pid, signal.SIGKILL)
                _wait_exit(pid, 10.0)
                _CHILDREN.pop(pid, None)
            self.pid_path.unlink(missing_ok=True)
            return pid

    def is_running(self) -> bool:
        """True when the broker process is alive and answers Kafka requests."""
        return self._running(self._broker_pid(), self._stored_ports())

    def status(self) -> dict[str, Any]:
        """Where the broker is and whether it runs, for ``corpusfactory broker status``."""
        pid = self._broker_pid()
        ports = self._stored_ports()
        return {
            "running": self._running(pid, ports),
            "pid": pid,
            "bootstrap": _address(ports[0]) if ports else None,
            "port": ports[0] if ports else None,
            "controller_port": ports[1] if ports else None,
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
        }

    # ---- process bookkeeping

    @staticmethod
    def _running(pid: int | None, ports: tuple[int, int] | None) -> bool:
        # Alive is not enough: a starting or wedged broker does not serve clients.
        return pid is not None and ports is not None and _answers_kafka(ports[0])

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def _broker_pid(self) -> int | None:
        """The pid in broker.pid if that process is alive and is this broker."""
        pid = self._read_pid()
        if pid is None or not _process_alive(pid):
            return None
        # A recycled pid belonging to some other program must never be signalled.
        cmdline = _cmdline(pid)
        if cmdline is not None and str(self.config_path).encode() not in cmdline:
            return None
        return pid

    def _await_existing(self, pid: int, timeout: float) -> str:
        ports = self._stored_ports()
        if ports is None:
            raise BrokerError(
                f"a broker runs with pid {pid} but {self.ports_path} is missing: "
                "run `corpusfactory broker stop` and start it again"
            )
        # It may still be starting (another command launched it a moment ago).
        self._wait_ready(pid, ports[0], timeout, stop_hint=True)
        return _address(ports[0])

    def _spawn(self) -> tuple[int, int]:
        """Write the configuration, format the storage once and launch the JVM; returns
        its pid and client port. The caller holds the lock and found no broker running."""
        self.pid_path.unlink(missing_ok=True)  # stale: its process is gone
        java = java_executable()
        libs = ensure_jars()
        port, controller_port = self._choose_ports()
        self._write_config(port, controller_port)
        self._format_storage(java, libs)
        return self._launch(java, libs).pid, port

    def _await_spawned(self, pid: int, port: int, timeout: float) -> None:
        try:
            self._wait_ready(pid, port, timeout)
        except BaseException:
            # Never leave a half-started broker behind (also on Ctrl-C).
            self._terminate(pid, timeout=10.0)
            self.pid_path.unlink(missing_ok=True)
            raise

    def _terminate(self, pid: int, timeout: float) -> None:
        _signal(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout):
            _signal(pid, signal.SIGKILL)
            _wait_exit(pid, 10.0)
        _CHILDREN.pop(pid, None)

    # ---- ports

    def _stored_ports(self) -> tuple[int, int] | None:
        try:
            data = json.loads(self.ports_path.read_text(encoding="utf-8"))
            return int(data["port"]), int(data["controller_port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _choose_ports(self) -> tuple[int, int]:
        stored = self._stored_ports() or (0, 0)
        port = self._requested_port or stored[0]
        controller_port = self._requested_controller_port or stored[1]
        free = iter(_free_ports(2))
        port = port or next(free)
        controller_port = controller_port or next(p for p in free if p != port)
        if port == controller_port:
            raise BrokerError(f"the broker and controller ports must differ (both {port})")
        for p in (port, controller_port):
            if not _port_free(p):
                raise BrokerError(
                    f"port {p} for the embedded broker is in use by another program; stop it, "
                    f"or delete {self.ports_path} to pick new ports"
                )
        if (port, controller_port) != stored:
            payload = {"port": port, "controller_port": controller_port}
            _write_atomic(self.ports_path, json.dumps(payload) + "\n")
        return port, controller_port

    # ---- configuration and storage

    def _write_config(self, port: int, controller_port: int) -> None:
        # Rewritten on every start so a changed port or a newer template applies.
        _write_atomic(self.config_path, self._properties(port, controller_port))
        _write_atomic(self.log4j_path, _LOG4J_PROPERTIES)

    def _properties(self, port: int, controller_port: int) -> str:
        return _server_properties(self.data_dir, port, controller_port)

    def _cluster_id(self) -> str:
        """The id the storage is formatted with: a fresh one for a single node."""
        return _random_cluster_id()

    def _jvm_opts(self) -> tuple[str, ...]:
        return BASE_JVM_OPTS

    def _format_storage(self, java: str, libs: Path) -> None:
        # KRaft log dirs must be formatted with a cluster id once; meta.properties
        # marks a formatted directory, and --ignore-formatted covers a race.
        if (self.data_dir / "meta.properties").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            java, *TOOL_JVM_OPTS, "-cp", _classpath(libs), self._log4j_option(),
            "kafka.tools.StorageTool", "format", "-t", self._cluster_id(),
            "-c", str(self.config_path), "--ignore-formatted",
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError("formatting the Kafka storage took over 3 minutes") from exc
        if done.returncode != 0:
            raise BrokerError(
                f"formatting the Kafka storage in {self.data_dir} failed "
                f"(exit {done.returncode}):\n" + _tail(done.stdout + done.stderr)
            )

    def _log4j_option(self) -> str:
        return f"-Dlog4j.configuration={self.log4j_path.as_uri()}"

    # ---- launching and readiness

    def _launch(self, java: str, libs: Path) -> subprocess.Popen[bytes]:
        _rotate(self.log_path)
        cmd = [
            java, *self._jvm_opts(), *_extra_jvm_opts(), "-cp", _classpath(libs),
            self._log4j_option(), "kafka.Kafka", str(self.config_path),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            # A banner separates the runs appended to the same log.
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"----- corpusfactory: starting the Kafka broker at {stamp}\n".encode())
            log.flush()
            # Its own session: Ctrl-C in the starting terminal does not reach it,
            # and it keeps running after the CLI command returns.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        _write_atomic(self.pid_path, f"{proc.pid}\n")
        return proc

    def _wait_ready(self, pid: int, port: int, timeout: float, stop_hint: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not _process_alive(pid):
                raise BrokerError(
                    f"the Kafka broker exited during startup; the end of {self.log_path}:\n"
                    + self._log_tail()
                )
            if _answers_kafka(port):
                return
            if time.monotonic() >= deadline:
                hint = "; run `corpusfactory broker stop` and retry" if stop_hint else ""
                raise BrokerError(
                    f"the Kafka broker did not answer on {_address(port)} within {timeout:g}s"
                    f"{hint}; the end of {self.log_path}:\n" + self._log_tail()
                )
            time.sleep(0.2)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                return _tail(fh.read().decode("utf-8", errors="replace"))
        except OSError:
            return "(no broker log)"


# --------------------------------------------------------------------------- cluster

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
        return ",".join(_address(p) for _, (p, _) in sorted(self.ports.items()))

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
        return _server_properties(
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
        with _file_lock(self.home / ".lock"), contextlib.ExitStack() as locks:
            layout = self._stored_layout() or self._new_layout()
            nodes = [ClusterNode(self.home, n, layout) for n in self.node_ids]
            for node in nodes:  # always in node order, so two starts cannot deadlock
                node.home.mkdir(parents=True, exist_ok=True)
                locks.enter_context(_file_lock(node.home / ".lock"))
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
                    _signal(pid, signal.SIGTERM)
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
            while (known := _brokers_known(port)) < self.size:
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
                locks.enter_context(_file_lock(node.home / ".lock"))
            pids = [(node, node._broker_pid()) for node in nodes]
            for _, pid in pids:
                if pid is not None:
                    _signal(pid, signal.SIGTERM)
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
        free = _free_ports(2 * self.size)  # all at once, so they are distinct
        ports = {n: (free[2 * i], free[2 * i + 1]) for i, n in enumerate(self.node_ids)}
        layout = ClusterLayout(_random_cluster_id(), ports)
        nodes = {str(n): {"port": p, "controller_port": c} for n, (p, c) in layout.ports.items()}
        payload = {"cluster_id": layout.cluster_id, "nodes": nodes}
        _write_atomic(self.layout_path, json.dumps(payload, indent=1) + "\n")
        return layout


# --------------------------------------------------------------------------- templates


def _server_properties(
    data_dir: Path,
    port: int,
    controller_port: int,
    *,
    node_id: int = 1,
    voters: str | None = None,
    replicas: int = 1,
    min_isr: int = 1,
) -> str:
    """One node's server.properties. Alone (the defaults) it is its own quorum; in a
    cluster ``voters`` lists every controller and the internal topics are replicated
    ``replicas`` times, acknowledged by ``min_isr`` of them."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Internal topics (consumer offsets, producer ids) get one replica per node.
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min_isr),
        "min.insync.replicas": str(min_isr),
        "default.replication.factor": str(replicas),
        # Fewer internal partitions than the default 50: faster first group join.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.num.partitions": "8",
        # Consumers (the Faust workers) start at once instead of waiting 3 s.
        "group.initial.rebalance.delay.ms": "0",
        # Topics come from ensure_topics only, so a typo cannot create one.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        # The corpus is kept until deleted by hand.
        "log.retention.ms": "-1",
        # Thread pools sized for a laptop or a 2-core CI machine.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    lines = [f"{k}={v}" for k, v in settings.items()]
    return (
        "# Generated by corpusfactory on every broker start; edits are lost.\n"
        + "\n".join(lines)
        + "\n"
    )


# Kafka 3.9 logs through reload4j (log4j 1.x). Everything goes to stdout, which
# is broker.log; only startup/shutdown milestones are kept at INFO.
_LOG4J_PROPERTIES = """\
# Generated by corpusfactory on every broker start; edits are lost.
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
log4j.logger.kafka.server.SharedServer=INFO
"""


def _random_cluster_id() -> str:
    # Kafka's Uuid format: 16 random bytes, URL-safe base64 without padding. Kafka
    # itself never issues ids starting with "-" (they read as command-line flags).
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


# --------------------------------------------------------------------------- helpers


def _address(port: int) -> str:
    return f"{HOST}:{port}"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])


def _write_atomic(path: Path, text: str) -> None:
    # A reader (or a crash) never sees a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _rotate(log_path: Path) -> None:
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_name(log_path.name + ".1"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two `broker start` at once, or a download)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open together so the kernel hands out distinct ports.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as the JVM uses it, so connections of the previous broker run
    # lingering in TIME_WAIT do not count as "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _cmdline(pid: int) -> bytes | None:
    """The process's command line, or None where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _process_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers kill(pid, 0) but is gone; /proc tells them apart on Linux.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _answers_kafka(port: int, timeout: float = 2.0) -> bool:
    """True when a Kafka ApiVersions request on the port gets a well-formed answer.

    A bound port alone proves little: KRaft brokers accept connections before they
    serve requests. The broker only processes requests once it is unfenced, i.e.
    ready for clients, so any answer means ready. ApiVersions v0 is the one request
    every Kafka version understands.
    """
    payload = _kafka_request(port, api_key=18, version=0, body=b"", timeout=timeout)
    return payload is not None and payload[:2] == b"\x00\x00"  # error code 0


def _brokers_known(port: int, timeout: float = 2.0) -> int:
    """How many live brokers the broker on the port knows of (0 if it does not answer).

    A Metadata v4 request for no topics: the answer starts with the throttle time,
    then the array of the brokers in the node's metadata (unfenced ones only).
    """
    body = struct.pack(">ib", 0, 0)  # topics: empty array; allow_auto_topic_creation: false
    payload = _kafka_request(port, api_key=3, version=4, body=body, timeout=timeout)
    if payload is None or len(payload) < 8:
        return 0
    (count,) = struct.unpack(">i", payload[4:8])
    return max(0, count)


def _kafka_request(
    port: int, api_key: int, version: int, body: bytes, timeout: float
) -> bytes | None:
    """Send one request (header v1) and return the response after its correlation id,
    or None when no well-formed answer comes."""
    correlation_id = 0x5EED
    client_id = b"corpusfactory-probe"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    request = header + body
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 6 <= size <= 16 * 1_048_576:
                return None  # not Kafka speaking
            payload = _recv_exact(sock, size)
    except (OSError, struct.error):
        return None
    (got_id,) = struct.unpack(">i", payload[:4])
    return payload[4:] if got_id == correlation_id else None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks.extend(chunk)
    return bytes(chunks)


def resolve_bootstrap(settings: Settings, start_embedded: bool = True) -> str:
    """The bootstrap servers: the configured cluster, else the embedded broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    broker = embedded_broker(settings)
    address = broker.bootstrap
    if address is not None and broker.is_running():
        return address
    if not start_embedded:
        raise BrokerError("broker not running: run `corpusfactory broker start`")
    return broker.start()


def embedded_broker(settings: Settings) -> EmbeddedBroker:
    """The embedded broker living under the settings' state directory."""
    return EmbeddedBroker(
        settings.state_path,
        port=settings.kafka.embedded_port,
        controller_port=settings.kafka.embedded_controller_port,
    )
