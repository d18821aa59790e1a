"""The embedded single-node KRaft broker, and how a component finds its bootstrap servers.

``EmbeddedBroker`` keeps its files under ``<state_dir>/kafka/`` and runs detached;
``resolve_bootstrap`` gives the configured cluster, else the embedded broker (started
if need be).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import write_text_atomic
from corpusfactory.engines.broker.config import (
    BASE_JVM_OPTS,
    LOG4J_PROPERTIES,
    TOOL_JVM_OPTS,
    random_cluster_id,
    server_properties,
)
from corpusfactory.engines.broker.jars import (
    classpath,
    ensure_jars,
    extra_jvm_opts,
    java_executable,
)
from corpusfactory.engines.broker.probe import answers_kafka
from corpusfactory.engines.broker.processes import (
    CHILDREN,
    file_lock,
    free_ports,
    loopback_address,
    port_free,
    process_alive,
    process_cmdline,
    rotate_log,
    send_signal,
    tail_lines,
    wait_exit,
)
from corpusfactory.errors import BrokerError
from corpusfactory.settings import Settings


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
        return loopback_address(ports[0]) if ports else None

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker (or find it running) and return its bootstrap address."""
        self.home.mkdir(parents=True, exist_ok=True)
        with file_lock(self.home / ".lock"):
            pid = self._broker_pid()
            if pid is not None:
                return self._await_existing(pid, timeout)
            pid, port = self._spawn()
            self._await_spawned(pid, port, timeout)
            return loopback_address(port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout`` seconds. No-op if stopped."""
        if not self.home.is_dir():
            return
        with file_lock(self.home / ".lock"):
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
        with file_lock(self.home / ".lock"):
            pid = self._broker_pid()
            if pid is not None:
                send_signal(pid, signal.SIGKILL)
                wait_exit(pid, 10.0)
                CHILDREN.pop(pid, None)
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
            "bootstrap": loopback_address(ports[0]) if ports else None,
            "port": ports[0] if ports else None,
            "controller_port": ports[1] if ports else None,
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
        }

    # ---- process bookkeeping

    @staticmethod
    def _running(pid: int | None, ports: tuple[int, int] | None) -> bool:
        # Alive is not enough: a starting or wedged broker does not serve clients.
        return pid is not None and ports is not None and answers_kafka(ports[0])

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def _broker_pid(self) -> int | None:
        """The pid in broker.pid if that process is alive and is this broker."""
        pid = self._read_pid()
        if pid is None or not process_alive(pid):
            return None
        # A recycled pid belonging to some other program must never be signalled.
        cmdline = process_cmdline(pid)
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
        return loopback_address(ports[0])

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
        send_signal(pid, signal.SIGTERM)
        if not wait_exit(pid, timeout):
            send_signal(pid, signal.SIGKILL)
            wait_exit(pid, 10.0)
        CHILDREN.pop(pid, None)

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
        free = iter(free_ports(2))
        port = port or next(free)
        controller_port = controller_port or next(p for p in free if p != port)
        if port == controller_port:
            raise BrokerError(f"the broker and controller ports must differ (both {port})")
        for p in (port, controller_port):
            if not port_free(p):
                raise BrokerError(
                    f"port {p} for the embedded broker is in use by another program; stop it, "
                    f"or delete {self.ports_path} to pick new ports"
                )
        if (port, controller_port) != stored:
            payload = {"port": port, "controller_port": controller_port}
            write_text_atomic(self.ports_path, json.dumps(payload) + "\n")
        return port, controller_port

    # ---- configuration and storage

    def _write_config(self, port: int, controller_port: int) -> None:
        # Rewritten on every start so a changed port or a newer template applies.
        write_text_atomic(self.config_path, self._properties(port, controller_port))
        write_text_atomic(self.log4j_path, LOG4J_PROPERTIES)

    def _properties(self, port: int, controller_port: int) -> str:
        return server_properties(self.data_dir, port, controller_port)

    def _cluster_id(self) -> str:
        """The id the storage is formatted with: a fresh one for a single node."""
        return random_cluster_id()

    def _jvm_opts(self) -> tuple[str, ...]:
        return BASE_JVM_OPTS

    def _format_storage(self, java: str, libs: Path) -> None:
        # KRaft log dirs must be formatted with a cluster id once; meta.properties
        # marks a formatted directory, and --ignore-formatted covers a race.
        if (self.data_dir / "meta.properties").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            java, *TOOL_JVM_OPTS, "-cp", classpath(libs), self._log4j_option(),
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
                f"(exit {done.returncode}):\n" + tail_lines(done.stdout + done.stderr)
            )

    def _log4j_option(self) -> str:
        return f"-Dlog4j.configuration={self.log4j_path.as_uri()}"

    # ---- launching and readiness

    def _launch(self, java: str, libs: Path) -> subprocess.Popen[bytes]:
        rotate_log(self.log_path)
        cmd = [
            java, *self._jvm_opts(), *extra_jvm_opts(), "-cp", classpath(libs),
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
        CHILDREN[proc.pid] = proc
        write_text_atomic(self.pid_path, f"{proc.pid}\n")
        return proc

    def _wait_ready(self, pid: int, port: int, timeout: float, stop_hint: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not process_alive(pid):
                raise BrokerError(
                    f"the Kafka broker exited during startup; the end of {self.log_path}:\n"
                    + self._log_tail()
                )
            if answers_kafka(port):
                return
            if time.monotonic() >= deadline:
                hint = "; run `corpusfactory broker stop` and retry" if stop_hint else ""
                raise BrokerError(
                    f"the Kafka broker did not answer on {loopback_address(port)} "
                    f"within {timeout:g}s"
                    f"{hint}; the end of {self.log_path}:\n" + self._log_tail()
                )
            time.sleep(0.2)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                return tail_lines(fh.read().decode("utf-8", errors="replace"))
        except OSError:
            return "(no broker log)"


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
