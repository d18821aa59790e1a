"""The producer's durable conversation store (SQLite, WAL, ``synchronous=FULL``).

Conversation state survives a producer crash: the producer saves a conversation
with its pending turn BEFORE sending the candidate, so after a restart
``load_active`` returns it and the candidate is re-sent with the same turn id
(admission downstream is idempotent on ``turn_id``). Finished or truncated
conversations stay until published; ``load_unpublished`` finds those a crash
left behind, ``mark_published`` records the publication.

Every change runs in its own transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``).
One store object may be used from several threads; calls are serialised.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

from producers.conversation import Conversation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    status          TEXT NOT NULL,
    published       INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_status ON conversations (status, published);
"""


class ConversationStore:
    """Conversations by id, in a SQLite file at ``path``."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; we open them explicitly.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL also applies to the WAL: a committed save survives power loss, not only a crash.
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._transaction() as cur:
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                cur.execute(stmt)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("conversation store is closed")
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def save(self, conv: Conversation) -> None:
        """Insert or replace the state of ``conv`` (durable when this returns)."""
        now = time.time()
        with self._transaction() as cur:
            cur.execute(
                """
                INSERT INTO conversations
                    (conversation_id, status, published, state, created_at, updated_at)
                VALUES (?, ?, 0, ?, ?, ?)
                ON CONFLICT (conversation_id) DO UPDATE SET
                    status = excluded.status,
                    state = excluded.state,
                    updated_at = excluded.updated_at
                """,
                (conv.conversation_id, conv.status, conv.to_json(), conv.created_at, now),
            )

    def get(self, conversation_id: str) -> Conversation | None:
        row = self._one(
            "SELECT state FROM conversations WHERE conversation_id = ?", (conversation_id,)
        )
        return None if row is None else Conversation.from_json(row[0])

    def load_active(self) -> list[Conversation]:
        """Every conversation still in progress, oldest first."""
        return self._load("status = 'active'")

    def load_unpublished(self) -> list[Conversation]:
        """Finished or truncated conversations not yet marked published, oldest first."""
        return self._load("status != 'active' AND published = 0")

    def mark_published(self, conversation_id: str) -> None:
        """Record that ``conversation_id`` was published; KeyError if unknown."""
        with self._transaction() as cur:
            cur.execute(
                "UPDATE conversations SET published = 1, updated_at = ? WHERE conversation_id = ?",
                (time.time(), conversation_id),
            )
            if cur.rowcount == 0:
                raise KeyError(conversation_id)

    def counts(self) -> dict[str, int]:
        """Conversations by status (``active``, ``finished``, ``truncated``) and ``published``."""
        out = {"active": 0, "finished": 0, "truncated": 0, "published": 0}
        for status, n, published in self._all(
            "SELECT status, COUNT(*), SUM(published) FROM conversations GROUP BY status", ()
        ):
            out[status] = int(n)
            out["published"] += int(published or 0)
        return out

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------

    def _load(self, where: str) -> list[Conversation]:
        rows = self._all(
            f"SELECT state FROM conversations WHERE {where} ORDER BY created_at, conversation_id",
            (),
        )
        return [Conversation.from_json(r[0]) for r in rows]

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("conversation store is closed")
            return self._conn.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None
