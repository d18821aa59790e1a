"""Failure records: the items a follow-mode service gave up on, and why.

A service that follows a topic (the GGUF builder, the evaluator) and meets an error
on one item that trying again cannot fix (a snapshot the converter refuses, a task
file in an unknown layout) records the item here, counts it in its metrics, logs
one line and goes on with the next item. The record is a small JSON file beside the
item's results, so a restarted service skips the item instead of failing on it
again and again; it is tried again when the user asks for it by name
(``corpusfactory build --snapshot ID``, ``corpusfactory eval run --model ID``) or
deletes the record. Transient errors (``errors.is_transient``: an engine is down)
are never recorded: they are retried.

Layout: ``<root>/<item>.failure``, holding ``item``, ``reason`` (a short label, the
one the metrics use), ``error_type``, ``error`` (the message) and ``failed_at``.
The suffix keeps the records out of every ``*.json`` listing of results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import write_json_atomic
from corpusfactory.errors import CorpusFactoryError

SUFFIX = ".failure"


def error_line(exc: BaseException) -> str:
    """The first line of an error's message, with its type when it is not ours."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, CorpusFactoryError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class FailureRecords:
    """The failure records of one kind of item under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, item: str) -> Path:
        return self.root / f"{item}{SUFFIX}"

    def record(self, item: str, reason: str, exc: BaseException, **extra: Any) -> dict[str, Any]:
        """Write (atomically) and return the record of ``item`` failing with ``exc``."""
        rec = {
            "item": item,
            "reason": reason,
            "error_type": type(exc).__name__,
            "error": str(exc),
            "failed_at": time.time(),
            **extra,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(item), rec)
        return rec

    def get(self, item: str) -> dict[str, Any] | None:
        """The record of ``item``, or None. An unreadable record still counts as one."""
        path = self.path(item)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return {"item": item, "reason": "unknown", "error": f"unreadable record: {exc}"}
        return data if isinstance(data, dict) else {"item": item, "reason": "unknown"}

    def failed(self, item: str) -> bool:
        return self.path(item).is_file()

    def all(self) -> dict[str, dict[str, Any]]:
        """Item -> record, for every recorded failure."""
        if not self.root.is_dir():
            return {}
        items = sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}"))
        return {item: rec for item in items if (rec := self.get(item)) is not None}

    def clear(self, item: str) -> bool:
        """Forget the failure of ``item`` (it succeeded, or will be tried again)."""
        try:
            self.path(item).unlink()
        except FileNotFoundError:
            return False
        return True
