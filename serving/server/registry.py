"""Which model the server answers with, and swapping it without failing a request.

Every request takes a ``Lease`` on the current backend and gives it back when
its response is complete. ``swap(new)`` makes new leases go to ``new`` at once;
the old backend keeps serving the requests that hold a lease on it and is
closed when the last of them ends (in a background thread, so whoever releases
the last lease - possibly the event loop - never waits for a model to unload).

Model discovery is wired elsewhere: a follower that sees a new snapshot or build
calls ``registry.load(ref)``, which builds the backend with the ``loader`` hook
and swaps it in.

    registry = ModelRegistry(loader=lambda ref: load_backend("full", ref, settings))
    registry.load("/snapshots/snap-42")
    with registry.lease() as backend:
        ...
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from corpusfactory.errors import CorpusFactoryError
from serving.backends.base import Backend

log = logging.getLogger(__name__)

Loader = Callable[[str], Backend]


class NoModelError(CorpusFactoryError):
    """No model is loaded yet; requests are refused until one is."""


@dataclass(eq=False)
class _Entry:
    backend: Backend
    leases: int = 0
    retired: bool = False
    closed: Future[None] = field(default_factory=Future)


class Lease:
    """One request's hold on a backend. ``release`` is idempotent."""

    def __init__(self, registry: ModelRegistry, entry: _Entry) -> None:
        self._registry = registry
        self._entry: _Entry | None = entry
        self.backend = entry.backend

    def release(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._registry._release(entry)

    def __enter__(self) -> Backend:
        return self.backend

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelRegistry:
    """The current backend, reference-counted leases, and swaps."""

    def __init__(self, backend: Backend | None = None, loader: Loader | None = None) -> None:
        self.loader = loader
        self._lock = threading.Lock()
        self._current = _Entry(backend) if backend is not None else None
        self._active = 0
        self._swaps = 0

    @property
    def current_id(self) -> str | None:
        entry = self._current
        return entry.backend.id if entry else None

    @property
    def current_kind(self) -> str | None:
        entry = self._current
        return entry.backend.kind if entry else None

    @property
    def current_created(self) -> int | None:
        entry = self._current
        return entry.backend.created if entry else None

    @property
    def swap_count(self) -> int:
        return self._swaps

    @property
    def active_leases(self) -> int:
        return self._active

    def lease(self) -> Lease:
        """A hold on the current backend; raises NoModelError when none is loaded."""
        with self._lock:
            entry = self._current
            if entry is None:
                raise NoModelError("no model is loaded yet: wait for the first snapshot or build")
            entry.leases += 1
            self._active += 1
        return Lease(self, entry)

    def swap(self, backend: Backend) -> Future[None]:
        """Serve new requests with ``backend``; the future completes once the old one closed."""
        with self._lock:
            if self._current is not None and self._current.backend is backend:
                raise ValueError(f"{backend.id} is already being served")
            old, self._current = self._current, _Entry(backend)
            if old is None:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            self._swaps += 1
            old.retired = True
            idle = old.leases == 0
        log.info("serving %s (%s); %s retires", backend.id, backend.kind, old.backend.id)
        if idle:
            self._close_later(old)
        return old.closed

    def load(self, ref: str) -> Future[None]:
        """Build a backend with the ``loader`` hook (blocking) and swap it in."""
        if self.loader is None:
            raise CorpusFactoryError("this registry has no loader: pass loader= or call swap()")
        return self.swap(self.loader(ref))

    def close(self) -> Future[None]:
        """No more requests: close the current backend once its leases end."""
        with self._lock:
            entry, self._current = self._current, None
            if entry is None:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            entry.retired = True
            idle = entry.leases == 0
        if idle:
            self._close_later(entry)
        return entry.closed

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            self._active -= 1
            assert entry.leases >= 0, "a lease was released twice"
            idle = entry.retired and entry.leases == 0
        if idle:
            self._close_later(entry)

    def _close_later(self, entry: _Entry) -> None:
        def close() -> None:
            try:
                entry.backend.close()
            except Exception as exc:  # the swap stands; the failure is reported on the future
                log.exception("closing %s failed", entry.backend.id)
                entry.closed.set_exception(exc)
            else:
                entry.closed.set_result(None)

        threading.Thread(target=close, name=f"close:{entry.backend.id}", daemon=True).start()
