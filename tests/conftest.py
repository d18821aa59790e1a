"""Shared fixtures: one real Kafka broker for the whole test session."""

from __future__ import annotations

import atexit
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from corpusfactory.engines.broker import EmbeddedBroker

# Runs beside the tests and stops the broker if the test process dies without
# running its teardown (SIGKILL, os._exit from a timeout): its stdin is a pipe
# from the test process, which the kernel closes when that process goes away.
_WATCHDOG = """
import os, signal, sys, time
pid = int(sys.argv[1])
sys.stdin.buffer.read()
def alive():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"kafka.Kafka" in fh.read()
    except OSError:
        return False
if alive():
    os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        if not alive():
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
"""


def _start_watchdog(pid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(pid)],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it first
    )


def _stop_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    if watchdog.stdin is not None:
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of a real single-node Kafka broker, shared by the session."""
    broker = EmbeddedBroker(tmp_path_factory.mktemp("kafka-session"))
    # Teardown runs on Ctrl-C too; atexit covers an interpreter exit that skips it.
    atexit.register(broker.stop)
    bootstrap = broker.start(timeout=120)
    watchdog = _start_watchdog(broker.status()["pid"])
    try:
        yield bootstrap
    finally:
        broker.stop()
        _stop_watchdog(watchdog)
        atexit.unregister(broker.stop)


@pytest.fixture
def topic_prefix() -> str:
    """A fresh topic prefix (``t<hex8>.``) so tests never share topics."""
    return f"t{uuid.uuid4().hex[:8]}."
