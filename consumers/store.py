"""The durable, idempotent corpus store under ``<state_dir>/corpus/``.

Layout (every file is UTF-8 JSON Lines, one record per line)::

    corpus/
      accepted-00000.jsonl     accepted conversations, in the export schema
      accepted-00001.jsonl     ... a new shard every ``shard_lines`` lines
      decisions-00000.jsonl    admission decisions (for statistics)
      undecodable-00000.jsonl  events that could not be decoded (never lost silently)
      .lock                    held (flock) by the one process that writes

Guarantees:

* **Durable.** ``write_batch`` writes, flushes and ``fsync``\\ s every file it touched
  (and the directory when it created a shard) before it returns, so a caller that
  commits Kafka offsets after ``write_batch`` never commits an event that is not on
  disk.
* **Idempotent.** A conversation id already stored is skipped; the set of ids is
  rebuilt from the shards when the store is opened. A decision identical to one
  already stored for the same ``turn_id`` is skipped as well, and the statistics
  count each ``turn_id`` once, with its first non-replayed decision
  (``contract.count_decisions``). Undecodable events are counted once per (topic,
  partition, offset).
* **Crash-safe.** A crash in the middle of a write leaves at most a torn last line;
  opening the store for writing truncates it away and logs what was removed (the
  event it held was never committed to Kafka, so it is consumed again).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import atomic_open, fsync_dir
from corpusfactory.contract import (
    AcceptedConversation,
    Decision,
    count_decisions,
    prefer_decision,
)
from corpusfactory.errors import CorpusFactoryError
from corpusfactory.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_SHARD_LINES = 10_000
CORPUS_DIRNAME = "corpus"
ACCEPTED_PREFIX = "accepted"
DECISIONS_PREFIX = "decisions"
UNDECODABLE_PREFIX = "undecodable"
QUANTILES = (("p10", 0.10), ("p25", 0.25), ("p50", 0.50), ("p75", 0.75), ("p90", 0.90))

_CHUNK = 64 * 1024


class CorpusStoreError(CorpusFactoryError):
    """The corpus store cannot be opened or written (locked, disk error, bad path)."""


@dataclass(frozen=True)
class Undecodable:
    """An event that could not be decoded: where it came from, what it held, why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": None if self.key is None else self.key.decode("utf-8", errors="replace"),
            "value": None if self.value is None else self.value.decode("utf-8", errors="replace"),
            "error": self.error,
        }


@dataclass(frozen=True)
class Repair:
    """A torn last line removed from a shard when the store was opened."""

    path: Path
    removed_bytes: int
    kept_bytes: int


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


def _f(value: Any) -> float:
    return float(value)


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _judge_score(turn: Any) -> float | None:
    """A turn's LLM-judge score; None when it was not judged (or stored before the judge)."""
    value = turn.get("judge_score") if isinstance(turn, dict) else turn.judge_score
    return None if value is None else float(value)


def export_record(conv: AcceptedConversation | dict[str, Any]) -> dict[str, Any]:
    """An accepted conversation in the export schema (fixed key order, floats as floats)."""
    return {
        "conversation_id": str(_get(conv, "conversation_id")),
        "source": str(_get(conv, "source")),
        "truncated": bool(_get(conv, "truncated")),
        "target_length": int(_get(conv, "target_length")),
        "producer_id": str(_get(conv, "producer_id")),
        "generator": str(_get(conv, "generator")),
        "finished_at": _f(_get(conv, "finished_at")),
        "turns": [
            {
                "turn_id": str(_get(t, "turn_id")),
                "role": str(_get(t, "role")),
                "text": str(_get(t, "text")),
                "nll": _f(_get(t, "nll")),
                "similarity": _f(_get(t, "similarity")),
                "neighbour_id": str(_get(t, "neighbour_id")),
                "embedder": str(_get(t, "embedder")),
                "scorer": str(_get(t, "scorer")),
                "judge_score": _judge_score(t),
            }
            for t in _get(conv, "turns")
        ],
    }


def decision_record(decision: Decision) -> dict[str, Any]:
    """A decision as stored in the decisions shards (its contract fields)."""
    return dict(decision.asdict())


def dumps_line(obj: dict[str, Any]) -> bytes:
    """One JSON Lines record: compact UTF-8 JSON and a newline."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def quantiles(values: Iterable[float]) -> dict[str, float | None]:
    """p10..p90 with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        if not xs:
            out[name] = None
            continue
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[name] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def _digest(line: bytes) -> bytes:
    return hashlib.blake2b(line, digest_size=12).digest()


class _ShardSet:
    """The numbered shards ``<prefix>-NNNNN.jsonl`` of one record kind."""

    def __init__(self, root: Path, prefix: str, shard_lines: int) -> None:
        self.root = root
        self.prefix = prefix
        self.shard_lines = shard_lines
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{5,}})\.jsonl$")
        self._fh: Any = None  # the open current shard (binary append), writers only
        self._index = 0
        self._lines = 0  # lines in the current shard
        self._dirty = False

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.jsonl"

    def shards(self) -> list[Path]:
        found: list[tuple[int, Path]] = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = self._pattern.match(p.name)
                if m and p.is_file():
                    found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def repair(self) -> list[Repair]:
        """Truncate a torn (unterminated) last line away in every shard."""
        repairs = []
        for path in self.shards():
            r = _repair_tail(path)
            if r is not None:
                repairs.append(r)
        return repairs

    def read(self) -> Iterator[tuple[Path, int, bytes, dict[str, Any] | None]]:
        """(path, line number, raw line, parsed object or None if corrupt), in order.

        A torn last line (no newline) is not yielded: it is a write in progress, or
        a crash the writer repairs when it opens the store.
        """
        for path in self.shards():
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.endswith(b"\n"):
                        break
                    yield path, lineno, raw, _parse(raw)

    def open_for_append(self) -> None:
        shards = self.shards()
        if shards:
            last = shards[-1]
            m = self._pattern.match(last.name)
            assert m is not None
            self._index = int(m.group(1))
            self._lines = _count_lines(last)
            self._fh = last.open("ab")
        else:
            self._index = 0
            self._lines = 0
            self._fh = (self.root / self.name(0)).open("ab")
            fsync_dir(self.root)

    def append(self, lines: list[bytes]) -> None:
        for line in lines:
            if self._lines >= self.shard_lines:
                self._roll()
            self._fh.write(line)
            self._lines += 1
            self._dirty = True

    def _roll(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._index += 1
        self._lines = 0
        self._fh = (self.root / self.name(self._index)).open("ab")
        fsync_dir(self.root)
        log.info("corpus store: started shard %s", self.name(self._index))

    def sync(self) -> None:
        if self._fh is not None and self._dirty:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._dirty = False

    def close(self) -> None:
        if self._fh is not None:
            try:
                self.sync()
            finally:
                self._fh.close()
                self._fh = None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            n += chunk.count(b"\n")
    return n


def _repair_tail(path: Path) -> Repair | None:
    """If the file does not end with a newline, cut it after its last newline."""
    size = path.stat().st_size
    if size == 0:
        return None
    with path.open("r+b") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return None
        keep = 0
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            chunk = fh.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        fh.seek(keep)
        torn = fh.read(min(size - keep, 200))
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning(
        "corpus store: %s ended with a torn line (%d bytes, starting %r); truncated it "
        "away (the event it held was not committed and is read again from Kafka)",
        path,
        size - keep,
        torn[:80],
    )
    return Repair(path=path, removed_bytes=size - keep, kept_bytes=keep)


@dataclass
class _Tally:
    """The in-memory indexes and aggregates behind dedupe and ``stats()``."""

    ids: set[str] = field(default_factory=set)
    truncated: int = 0
    by_source: Counter[str] = field(default_factory=Counter)
    by_source_truncated: Counter[tuple[str, bool]] = field(default_factory=Counter)
    messages: int = 0
    # turn_id -> the record that counts for the turn (contract.prefer_decision)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # turn_id -> digests of the distinct decision lines stored for it
    digests: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    decision_lines: int = 0
    undecodable: set[tuple[str, int, int]] = field(default_factory=set)
    corrupt_lines: int = 0
    duplicate_lines: int = 0  # conversation ids found twice on disk (first one counts)

    def add_conversation(self, rec: dict[str, Any]) -> None:
        self.ids.add(rec["conversation_id"])
        if rec.get("truncated"):
            self.truncated += 1
        self.by_source[str(rec.get("source", ""))] += 1
        self.by_source_truncated[str(rec.get("source", "")), bool(rec.get("truncated"))] += 1
        self.messages += len(rec.get("turns") or ())

    def add_decision(self, rec: dict[str, Any], digest: bytes) -> None:
        tid = rec["turn_id"]
        seen = self.digests.get(tid, ())
        if digest not in seen:
            self.digests[tid] = (*seen, digest)
        if prefer_decision(self.decisions.get(tid), rec):
            self.decisions[tid] = {
                "turn_id": tid,
                "accepted": bool(rec["accepted"]),
                "reason": str(rec["reason"]),
                "nll": float(rec["nll"]),
                "replayed": bool(rec.get("replayed")),
            }
        self.decision_lines += 1


def _valid_conversation(rec: dict[str, Any] | None) -> bool:
    return (
        rec is not None
        and isinstance(rec.get("conversation_id"), str)
        and isinstance(rec.get("turns"), list)
    )


def _valid_decision(rec: dict[str, Any] | None) -> bool:
    return (
        rec is not None
        and isinstance(rec.get("turn_id"), str)
        and isinstance(rec.get("accepted"), bool)
        and isinstance(rec.get("reason"), str)
        and isinstance(rec.get("nll"), int | float)
    )


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
        self._accepted = _ShardSet(self.root, ACCEPTED_PREFIX, shard_lines)
        self._decisions = _ShardSet(self.root, DECISIONS_PREFIX, shard_lines)
        self._undecodable = _ShardSet(self.root, UNDECODABLE_PREFIX, shard_lines)
        self._sets = (self._accepted, self._decisions, self._undecodable)
        self._tally = _Tally()
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
            if not _valid_conversation(rec):
                self._corrupt(path, lineno, raw)
                continue
            assert rec is not None
            if rec["conversation_id"] in t.ids:
                t.duplicate_lines += 1
                continue
            t.add_conversation(rec)
        for path, lineno, raw, rec in self._decisions.read():
            if not _valid_decision(rec):
                self._corrupt(path, lineno, raw)
                continue
            assert rec is not None
            t.add_decision(rec, _digest(raw))
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
            if _valid_decision(rec):
                assert rec is not None
                yield rec

    def _iter_accepted(self, include_truncated: bool) -> Iterator[tuple[bytes, dict[str, Any]]]:
        seen: set[str] = set()
        for _, _, raw, rec in self._accepted.read():
            if not _valid_conversation(rec):
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
            digest = _digest(line)
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
