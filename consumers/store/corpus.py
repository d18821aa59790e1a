"""``CorpusStore``: the corpus store's lock, its loading from the shards, durable
``write_batch``, statistics and export (the layout and guarantees are in the package
docstring, ``consumers.store``)."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumers.store.records import (
    Undecodable,
    decision_record,
    dumps_line,
    export_record,
    line_digest,
    valid_conversation,
    valid_decision,
)
from consumers.store.shards import Repair, ShardSet
from consumers.store.tally import Tally, quantiles
from corpusfactory.atomicio import atomic_open
from corpusfactory.contract import AcceptedConversation, Decision, count_decisions
from corpusfactory.errors import CorpusFactoryError
from corpusfactory.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_SHARD_LINES = 10_000
CORPUS_DIRNAME = "corpus"
ACCEPTED_PREFIX = "accepted"
DECISIONS_PREFIX = "decisions"
UNDECODABLE_PREFIX = "undecodable"


class CorpusStoreError(CorpusFactoryError):
    """The corpus store cannot be opened or written (locked, disk error, bad path)."""


@dataclass
class BatchResult:
    """What one ``write_batch`` call wrote and skipped."""

    accepted_written: int = 0
    accepted_skipped: int = 0  # conversation id already stored (or twice in the batch)
    decisions_written: int = 0
    decisions_skipped: int = 0  # identical decision already stored
    undecodable_written: int = 0
    undecodable_skipped: int = 0  # same (topic, partition, offset) already stored


def corpus_dir(settings: Settings) -> Path:
    """``<state_dir>/corpus``: where the store of these settings lives."""
    return settings.state_path / CORPUS_DIRNAME


class CorpusStore:
    """The accepted corpus, its decisions and its undecodable events, on disk.

    ``CorpusStore(path)`` opens (creating it if needed) the store in directory
    ``path`` for writing: it takes an exclusive lock, repairs torn last lines and
    rebuilds its indexes from the shards. ``read_only=True`` takes no lock, changes
    nothing and ignores a torn last line (use it to read a store a writer is using).
    Use ``CorpusStore.from_settings(settings)`` for ``<state_dir>/corpus``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shard_lines: int = DEFAULT_SHARD_LINES,
        read_only: bool = False,
    ) -> None:
        if shard_lines < 1:
            raise ValueError("shard_lines must be >= 1")
        self.root = Path(path).expanduser().resolve()
        self.shard_lines = shard_lines
        self.read_only = read_only
        self.repairs: list[Repair] = []
        self._failed: str | None = None
        self._lock_fd: int | None = None
        self._accepted = ShardSet(self.root, ACCEPTED_PREFIX, shard_lines)
        self._decisions = ShardSet(self.root, DECISIONS_PREFIX, shard_lines)
        self._undecodable = ShardSet(self.root, UNDECODABLE_PREFIX, shard_lines)
        self._sets = (self._accepted, self._decisions, self._undecodable)
        self._tally = Tally()
        if read_only:
            if not self.root.is_dir():
                raise CorpusStoreError(f"no corpus store at {self.root}")
            self._load()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CorpusStoreError(f"cannot create the corpus store at {self.root}: {exc}") from exc
        self._lock()
        try:
            for s in self._sets:
                self.repairs.extend(s.repair())
            self._load()
            for s in self._sets:
                s.open_for_append()
        except BaseException:
            self.close()
            raise
        log.info(
            "corpus store %s: %d conversation(s), %d decided turn(s), %d undecodable event(s)",
            self.root,
            len(self._tally.ids),
            len(self._tally.decisions),
            len(self._tally.undecodable),
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, shard_lines: int = DEFAULT_SHARD_LINES, read_only: bool = False
    ) -> CorpusStore:
        return cls(corpus_dir(settings), shard_lines=shard_lines, read_only=read_only)

    # -- lifecycle ---------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CorpusStoreError(
                f"the corpus store at {self.root} is open for writing elsewhere "
                "(another corpus writer holds its lock); stop it first or open read-only"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Flush, fsync and close the shards and release the lock. Idempotent."""
        try:
            for s in self._sets:
                s.close()
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> CorpusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------

    def _corrupt(self, path: Path, lineno: int, raw: bytes) -> None:
        self._tally.corrupt_lines += 1
        log.error(
            "corpus store: %s line %d is not a valid record, skipped: %r",
            path,
            lineno,
            raw[:120],
        )

    def _load(self) -> None:
        t = self._tally
        for path, lineno, raw, rec in self._accepted.read():
            if not valid_conversation(rec):
                self._corrupt(path, lineno, raw)
                continue
            assert rec is not None
            if rec["conversation_id"] in t.ids:
                t.duplicate_lines += 1
                continue
            t.add_conversation(rec)
        for path, lineno, raw, rec in self._decisions.read():
            if not valid_decision(rec):
                self._corrupt(path, lineno, raw)
                continue
            assert rec is not None
            t.add_decision(rec, line_digest(raw))
        for path, lineno, raw, rec in self._undecodable.read():
            if (
                rec is None
                or not isinstance(rec.get("topic"), str)
                or not isinstance(rec.get("partition"), int)
                or not isinstance(rec.get("offset"), int)
            ):
                self._corrupt(path, lineno, raw)
                continue
            t.undecodable.add((rec["topic"], rec["partition"], rec["offset"]))

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._tally.ids

    def __len__(self) -> int:
        return len(self._tally.ids)

    def counts(self) -> tuple[dict[tuple[str, bool], int], int, int]:
        """Cheap running totals (metrics): conversations by (source, truncated), messages,
        decision records."""
        t = self._tally
        return dict(t.by_source_truncated), t.messages, t.decision_lines

    def shard_paths(self) -> dict[str, list[Path]]:
        """The shard files of each kind, in order."""
        return {s.prefix: s.shards() for s in self._sets}

    def iter_conversations(self, include_truncated: bool = True) -> Iterator[dict[str, Any]]:
        """The stored conversations (export schema), in shard order, each id once."""
        for _, rec in self._iter_accepted(include_truncated):
            yield rec

    def iter_decisions(self) -> Iterator[dict[str, Any]]:
        """Every stored decision record (contract fields), in shard order.

        Unlike ``stats()`` this does not dedupe: a turn may have several records
        (a replayed decision, a re-decision); the caller chooses. Lines that are not a
        valid decision are skipped, as when the store is opened.
        """
        for _, _, _, rec in self._decisions.read():
            if valid_decision(rec):
                assert rec is not None
                yield rec

    def _iter_accepted(self, include_truncated: bool) -> Iterator[tuple[bytes, dict[str, Any]]]:
        seen: set[str] = set()
        for _, _, raw, rec in self._accepted.read():
            if not valid_conversation(rec):
                continue
            assert rec is not None
            cid = rec["conversation_id"]
            if cid in seen:
                continue
            seen.add(cid)
            if include_truncated or not rec.get("truncated"):
                yield raw, rec

    # -- writing -----------------------------------------------------------------

    def write_batch(
        self,
        accepted: Iterable[AcceptedConversation] = (),
        decisions: Iterable[Decision] = (),
        undecodable: Iterable[Undecodable] = (),
    ) -> BatchResult:
        """Append a batch durably (write, flush, fsync) and return what was written.

        Only after this returns may the caller commit the Kafka offsets of the
        batch. If it raises, nothing of the batch may be committed; the store
        refuses further writes until it is reopened (which repairs a torn line).
        """
        if self.read_only:
            raise CorpusStoreError("the corpus store was opened read-only")
        if self._failed is not None:
            raise CorpusStoreError(
                f"an earlier write to the corpus store failed ({self._failed}); reopen it"
            )
        t = self._tally
        result = BatchResult()

        conv_lines: list[bytes] = []
        conv_recs: list[dict[str, Any]] = []
        pending_ids: set[str] = set()
        for conv in accepted:
            rec = export_record(conv)
            cid = rec["conversation_id"]
            if cid in t.ids or cid in pending_ids:
                result.accepted_skipped += 1
                log.debug("corpus store: conversation %s already stored, skipped", cid)
                continue
            pending_ids.add(cid)
            conv_lines.append(dumps_line(rec))
            conv_recs.append(rec)

        dec_lines: list[bytes] = []
        dec_recs: list[tuple[dict[str, Any], bytes]] = []
        pending_digests: set[bytes] = set()
        for dec in decisions:
            rec = decision_record(dec)
            line = dumps_line(rec)
            digest = line_digest(line)
            if digest in t.digests.get(rec["turn_id"], ()) or digest in pending_digests:
                result.decisions_skipped += 1
                continue
            pending_digests.add(digest)
            dec_lines.append(line)
            dec_recs.append((rec, digest))

        bad_lines: list[bytes] = []
        bad_keys: list[tuple[str, int, int]] = []
        for u in undecodable:
            key = (u.topic, u.partition, u.offset)
            if key in t.undecodable or key in bad_keys:
                result.undecodable_skipped += 1
                continue
            bad_keys.append(key)
            bad_lines.append(dumps_line(u.to_json()))

        try:
            for shard_set, lines in (
                (self._accepted, conv_lines),
                (self._decisions, dec_lines),
                (self._undecodable, bad_lines),
            ):
                if lines:
                    shard_set.append(lines)
            for s in self._sets:
                s.sync()
        except OSError as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            raise CorpusStoreError(
                f"writing to the corpus store at {self.root} failed: {exc}"
            ) from exc

        # On disk now: update the indexes.
        for rec in conv_recs:
            t.add_conversation(rec)
        for rec, digest in dec_recs:
            t.add_decision(rec, digest)
        t.undecodable.update(bad_keys)
        result.accepted_written = len(conv_recs)
        result.decisions_written = len(dec_recs)
        result.undecodable_written = len(bad_keys)
        return result

    # -- statistics and export ---------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Corpus and admission statistics.

        ``conversations``: stored conversations (each id once): ``total``,
        ``truncated``, ``complete``, ``by_source``, ``messages`` and
        ``mean_messages`` (messages per conversation, None when empty).
        ``turns``: decided turns, each ``turn_id`` once with its first non-replayed
        decision (``contract.count_decisions``, the rule the report and producers use):
        ``decided``, ``accepted``, ``rejected``, ``acceptance_rate``
        (accepted / decided, None when none), ``by_reason`` (every contract reason,
        zeros included), ``nll_accepted`` and ``nll_decided`` (p10, p25, p50, p75,
        p90 of the NLL of the accepted turns / of every decided turn).
        ``undecodable``: events skipped because they could not be decoded.
        ``corrupt_lines``: unreadable lines found in the shards when opened;
        ``duplicate_lines``: conversations found twice in the shards (counted once).
        ``decision_records``: decision lines stored (before the per-turn dedupe).
        Turns rejected before scoring carry ``nll = -1`` and are left out of the quantiles.
        """
        t = self._tally
        total = len(t.ids)
        counts = count_decisions(t.decisions.values())
        accepted_nll: list[float] = []
        all_nll: list[float] = []
        for d in t.decisions.values():
            if d["nll"] < 0:
                continue  # rejected before scoring (empty, too_long, wrong_language): no NLL
            all_nll.append(d["nll"])
            if d["accepted"]:
                accepted_nll.append(d["nll"])
        return {
            "conversations": {
                "total": total,
                "truncated": t.truncated,
                "complete": total - t.truncated,
                "by_source": dict(sorted(t.by_source.items())),
                "messages": t.messages,
                "mean_messages": (t.messages / total) if total else None,
            },
            "turns": {
                "decided": counts.decided,
                "accepted": counts.accepted,
                "rejected": counts.rejected,
                "acceptance_rate": counts.acceptance_rate,
                "by_reason": counts.by_reason,
                "nll_accepted": quantiles(accepted_nll),
                "nll_decided": quantiles(all_nll),
            },
            "decision_records": t.decision_lines,
            "undecodable": len(t.undecodable),
            "corrupt_lines": t.corrupt_lines,
            "duplicate_lines": t.duplicate_lines,
        }

    def export(self, out_path: str | os.PathLike[str], include_truncated: bool = True) -> int:
        """Write the corpus to ``out_path`` (JSON Lines, export schema, shard order).

        The file is written to a temporary name beside it, fsynced and renamed, so
        ``out_path`` is either the old file or the complete new one. Returns the
        number of conversations written.
        """
        out = Path(out_path).expanduser().resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with atomic_open(out, binary=True) as fh:
            for raw, _ in self._iter_accepted(include_truncated):
                fh.write(raw)
                n += 1
        log.info("corpus store: exported %d conversation(s) to %s", n, out)
        return n
