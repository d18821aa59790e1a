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
  event it held was never committed to Kafka, so it is consumed agai

The modules: ``corpus`` holds ``CorpusStore`` (locking, loading, ``write_batch``,
``stats``, ``export``); ``shards`` the numbered shard files of one record kind and the
repair of a torn last line; ``records`` the record formats (export schema, decision
lines, undecodable events) and their validation; ``tally`` the in-memory indexes and
aggregates and the NLL quantiles.
"""

from __future__ import annotations

from consumers.store.corpus import (
    ACCEPTED_PREFIX,
    CORPUS_DIRNAME,
    DECISIONS_PREFIX,
    DEFAULT_SHARD_LINES,
    UNDECODABLE_PREFIX,
    BatchResult,
    CorpusStore,
    CorpusStoreError,
    corpus_dir,
)
from consumers.store.records import Undecodable, decision_record, dumps_line, export_record
from consumers.store.shards import Repair
from consumers.store.tally import QUANTILES, quantiles

__all__ = [
    "ACCEPTED_PREFIX",
    "CORPUS_DIRNAME",
    "DECISIONS_PREFIX",
    "DEFAULT_SHARD_LINES",
    "QUANTILES",
    "UNDECODABLE_PREFIX",
    "BatchResult",
    "CorpusStore",
    "CorpusStoreError",
    "Repair",
    "Undecodable",
    "corpus_dir",
    "decision_record",
    "dumps_line",
    "export_record",
    "quantiles",
]
