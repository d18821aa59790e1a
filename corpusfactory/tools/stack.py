"""Run the local stack: worker processes beside the embedded broker.

Used by ``corpusfactory demo``, the pipeline benchmark and the integration
tests. Each worker is a real ``corpusfactory worker`` process with its settings
written to its own YAML file (``<state_dir>/run/<name>.yaml``: processes with other
settings on the same state directory, such as a replaying scorer, never start one
another), logging to ``<state_dir>/logs/<name>.log``; it is ready when it logs its
ready line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from corpusfactory.atomicio import write_text_atomic
from corpusfactory.errors import CorpusFactoryError
from corpusfactory.settings import Settings


def write_settings(settings: Settings, path: Path) -> Path:
    """Settings as a YAML profile that reproduces them exactly.

    The profile holds every setting, passwords and API keys included, so it is only
    ever readable by its owner (mode 0600): written to a temporary file created 0600
    beside it, then renamed over it, so no other user can read it at any moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = settings.model_dump(mode="json")
    data["state_dir"] = str(settings.state_path)
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False), mode=0o600)
    return path


class ServiceProcess:
    """One ``corpusfactory COMMAND ...`` process with the given settings."""

    def __init__(
        self, settings: Settings, command: list[str], name: str, ready_line: str | None = None
    ) -> None:
        self.command = command
        self.name = name
        self.ready_line = ready_line
        self.settings = settings
        logs = settings.state_path / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.name}.log"
        # Its own file, written again at each start (a restart runs with the settings
        # it was made with, whatever another process on this state directory wrote).
        self.config = settings.state_path / "run" / f"{self.name}.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> ServiceProcess:
        write_settings(self.settings, self.config)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "corpusfactory",
                    *self.command,
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a SIGKILL test hits this process alone
            )
        return self

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode("utf-8", errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        needle = self.ready_line or ""
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise CorpusFactoryError(
                    f"worker {self.name} exited with {self.proc.returncode}:\n"
                    + self.log_text()[-3000:]
                )
            time.sleep(0.3)
        raise CorpusFactoryError(
            f"worker {self.name} not ready after {timeout:.0f}s:\n{self.log_text()[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it and, e.g., its Milvus Lite server):
        no clean shutdown, no final commit, as when a container is killed."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def stop_all(processes: Sequence[ServiceProcess], timeout: float = 30.0) -> None:
    """Stop processes together: every SIGTERM first, then the waits (each shuts down
    in parallel with the others instead of one after the other)."""
    for p in processes:
        if p.alive and p.proc is not None:
            p.proc.send_signal(signal.SIGTERM)
    for p in processes:
        p.stop(timeout)


class WorkerProcess(ServiceProcess):
    """``corpusfactory worker --role ROLE``; ready once its agent has loaded its models."""

    def __init__(self, settings: Settings, role: str, name: str | None = None) -> None:
        super().__init__(settings, ["worker", "--role", role], name or role, f"{role} ready")
        self.role = role


class ProducerProcess(ServiceProcess):
    """``corpusfactory produce --conversations N``."""

    def __init__(self, settings: Settings, conversations: int, name: str = "producer") -> None:
        super().__init__(settings, ["produce", "--conversations", str(conversations)], name)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)
