"""Which model to serve, and following new ones as they are published.

``newest(settings, kind)`` names the model a server should serve now: for ``gguf`` the
newest *published* build of ``serving.quant`` (a build outside its gate budget is never
served), for ``full`` the newest complete snapshot (the base model before the first).

``ModelFollower`` keeps a ``ModelRegistry`` on the newest model: a thread reads
``models.builds`` (gguf) or ``models.snapshots`` (full) from their end, and on each
announcement loads the newest model in that thread and swaps it in; requests in flight
finish on the model they started with (the registry's leases). Without Kafka it looks
at the stores every ``poll_s`` seconds instead.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Literal

from corpusfactory.contract import BUILDS, SNAPSHOTS
from corpusfactory.engines.models.registry import resolve_model
from corpusfactory.kafka_clients import assign
from corpusfactory.kafka_clients import consumer as kafka_consumer
from corpusfactory.settings import Settings
from serving.backends import load_backend
from serving.builds import BuildStore
from serving.server.registry import ModelRegistry
from training.snapshots import SnapshotStore

log = logging.getLogger(__name__)

Kind = Literal["full", "gguf"]


def newest(settings: Settings, kind: Kind) -> tuple[str, Path] | None:
    """(model id, path) of the model to serve now, or None when there is none yet."""
    if kind == "gguf":
        build = BuildStore(settings.builds_path).newest_published(settings.serving.quant)
        if build is None:
            return None
        return f"{build.snapshot}-{build.quant}", build.path
    snap = SnapshotStore(settings.snapshots_path).latest()
    if snap is not None:
        return snap.id, snap.path
    base = settings.training.base_model
    return f"base-{base}", Path(resolve_model(base, settings.models.models_dir))


class ModelFollower:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        kind: Kind,
        bootstrap: str | None = None,
        poll_s: float = 10.0,
    ) -> None:
        self.s = settings
        self.registry = registry
        self.kind = kind
        self.bootstrap = bootstrap
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load and swap in the newest model if it is not the one served; True if swapped."""
        found = newest(self.s, self.kind)
        if found is None or found[0] == self.registry.current_id:
            return False
        model_id, path = found
        log.info("loading %s from %s", model_id, path)
        backend = load_backend(self.kind, path, self.s.serving, model_id=model_id)
        self.registry.swap(backend)
        return True

    def start(self) -> ModelFollower:
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        if self.bootstrap is None:
            while not self._stop.wait(self.poll_s):
                self._refresh_logged()
            return
        topic = self.s.topic(BUILDS if self.kind == "gguf" else SNAPSHOTS)
        consumer = kafka_consumer(self.s.kafka, self.bootstrap)
        try:
            assign(consumer, topic, "end", partitions=[0])
            # Anything published between the first refresh and this seek is picked up here.
            self._refresh_logged()
            while not self._stop.is_set():
                if consumer.poll(timeout_ms=1000):
                    self._refresh_logged()
        finally:
            consumer.close(autocommit=False)

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except Exception:  # a bad new model must not take the server down
            log.exception("could not load the newest %s model; still serving %s",
                          self.kind, self.registry.current_id)  # fmt: skip
