"""A real Milvus standalone server for the integration tests (PyPI ``milvus`` 2.3.5).

The ``milvus`` package ships the standalone binary (embedded etcd, RocksMQ, local
storage) and a small launcher. :class:`MilvusStandalone` wraps that launcher for a
test session:

* every listening port is chosen free once and then pinned, so a restart (the
  outage test stops the server and starts it again on the same base directory,
  where its data persists) serves the same URI; that includes the embedded etcd's
  client and peer ports (by default 2379 and 2380, whatever ``etcd.endpoints``
  says), set in an etcd config file the server is pointed at with
  ``ETCD_CONFIG_PATH``, so the server does not collide with another one or with
  a real etcd on this machine;
* the launcher's port check binds with ``SO_REUSEADDR``: Milvus (Go) does too, and
  without it a port left in TIME_WAIT by the stopped server fails the check for a
  minute;
* readiness is the server's own ``/healthz``, and a server that dies while
  starting fails at once with the tail of its log;
* ``session_ttl_s`` sets ``common.session.ttl`` (Milvus's default: 30 s). After a
  crash the server's components wait for their own stale etcd sessions to expire
  before queries work again (measured: about TTL - 5 s after ``/healthz`` is OK:
  25 s with the default, 6 s with 10 s). The launcher's ``stop`` is such a crash:
  it kills the server a second after SIGTERM, and Milvus 2.3.5 takes longer than a
  minute to stop on SIGTERM;
* a watchdog process stops the server if the test process dies without its
  teardown (SIGKILL, ``os._exit``), like the Kafka broker's in ``tests/conftest.py``.
  It reads the pid from a file rewritten at each start, and only signals a process
  whose command line is this server's own executable.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_WATCHDOG = """
import os, signal, sys, time
pid_file, exe = sys.argv[1], os.fsencode(sys.argv[2])
sys.stdin.buffer.read()
def server_pid():
    try:
        with open(pid_file, encoding="ascii") as fh:
            pid = int(fh.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return pid if fh.read().split(b"\\0")[0] == exe else None
    except (OSError, ValueError):
        return None
pid = server_pid()
if pid is not None:
    os.kill(pid, signal.SIGTERM)  # Milvus 2.3.5 takes over a minute on it: SIGKILL
    for _ in range(30):
        if server_pid() is None:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_config() -> Any:
    """The launcher's config with a port check that tolerates TIME_WAIT."""
    from milvus import MilvusServerConfig

    class ReusableConfig(MilvusServerConfig):
        def try_bind_port(self, port: int) -> socket.socket | None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                sock.close()
                return None
            return sock

    return ReusableConfig()


class MilvusStandalone:
    """One Milvus standalone server under ``base_dir``; ``uri`` stays the same across restarts."""

    def __init__(self, base_dir: Path, session_ttl_s: int | None = None) -> None:
        from milvus import MilvusServer

        self.base_dir = Path(base_dir).resolve()
        self._server = MilvusServer(_server_config(), wait_for_started=False)
        self._server.set_base_dir(str(self.base_dir))
        ports = [k for k in self._server.config_keys if k.endswith("_port")]
        self._server.config.update(**{k: _free_port() for k in ports})
        self._server.webservice_port = _free_port()
        if session_ttl_s is not None:
            self._server.config.set("common.session.ttl", int(session_ttl_s))
        self.etcd_config = self._write_etcd_config(
            int(self._server.config.configs["etcd_port"]), _free_port()
        )
        self.pid_file = self.base_dir / "server.pid"
        self.start_s: list[float] = []  # seconds each start took, until healthy
        self._starts = 0
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self._server.config.configs["proxy_port"])  # pinned, known before start

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def executable(self) -> str:
        return str(self._server.get_milvus_executable_path())

    @property
    def running(self) -> bool:
        proc = self._server.server_proc
        return proc is not None and proc.poll() is None

    def start(self, timeout: float = 180.0) -> float:
        """Start the server (again, on the same data) and wait until it is healthy.

        Returns the seconds it took.
        """
        if self.running:
            raise RuntimeError("the Milvus server is already running")
        self._keep_previous_logs()
        t0 = time.monotonic()
        cwd = os.getcwd()  # the launcher changes directory while it starts the binary
        # It passes its own environment on to the server: the one setting that is not in
        # its config template goes in there for the moment of the start.
        before = os.environ.get("ETCD_CONFIG_PATH")
        os.environ["ETCD_CONFIG_PATH"] = str(self.etcd_config)
        try:
            self._server.start()
        finally:
            os.chdir(cwd)
            if before is None:
                del os.environ["ETCD_CONFIG_PATH"]
            else:
                os.environ["ETCD_CONFIG_PATH"] = before
        proc = self._server.server_proc
        self.pid_file.write_text(str(proc.pid), encoding="ascii")
        if self._watchdog is None:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(self.pid_file), self.executable],
                stdin=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it first
            )
        self._wait_healthy(t0 + timeout)
        took = time.monotonic() - t0
        self.start_s.append(took)
        self._starts += 1
        log.info(
            "Milvus %s at %s: healthy after %.1fs (pid %d)", _version(), self.uri, took, proc.pid
        )
        return took

    def _write_etcd_config(self, client_port: int, peer_port: int) -> Path:
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        path = self.base_dir / "etcd.yaml"
        path.write_text(
            "name: milvus-test\n"
            f"listen-client-urls: {client}\n"
            f"advertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\n"
            f"initial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: milvus-test={peer}\n",
            encoding="utf-8",
        )
        return path

    def _wait_healthy(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self._server.webservice_port}/healthz"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP proxy
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"Milvus server exited while starting:\n{self.log_tail()}")
            try:
                with direct.open(url, timeout=2) as resp:
                    if b"OK" in resp.read():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Milvus server not healthy in time:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after a second: the launcher's own stop)."""
        self._server.stop()

    def close(self) -> None:
        """Stop the server and its watchdog (session teardown)."""
        self.stop()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=15)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("milvus-stdout.log", "milvus-stderr.log"):
            path = self.base_dir / "logs" / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def _keep_previous_logs(self) -> None:
        """The launcher truncates its logs at each start: keep the earlier run's."""
        if not self._starts:
            return
        for name in ("milvus-stdout", "milvus-stderr"):
            path = self.base_dir / "logs" / f"{name}.log"
            if path.exists():
                path.rename(path.with_name(f"{name}.{self._starts}.log"))


def _version() -> str:
    import milvus

    return str(milvus.__version__)
