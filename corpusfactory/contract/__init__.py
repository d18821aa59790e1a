"""The event contract: topic names and the typed records written to them.

This package is the project's public contract. Any producer may write
``CandidateTurn`` events to ``turns.candidates`` as UTF-8 JSON (the field names
below, plus ``"schema_version": 1``) keyed by ``conversation_id``; the workers
answer on ``turns.decisions`` with the same key, so all events of one
conversation stay in one partition and in order.

Topics (each name is prefixed by ``kafka.topic_prefix``):

==================== =============================================== ==================
topic                records                                          key
==================== =============================================== ==================
turns.candidates     CandidateTurn                                    conversation_id
turns.scored         ScoredTurn (internal: scorer -> admitter)        conversation_id
turns.decisions      Decision                                         conversation_id
corpus.accepted      AcceptedConversation                             conversation_id
turns.deadletter     DeadLetter                                       original key
models.snapshots     SnapshotPublished (1 partition)                  snapshot_id
models.evaluations   EvaluationPublished (1 partition)                model id
models.builds        BuildPublished (1 partition)                     snapshot_id
==================== =============================================== ==================

Fields added after the first release are optional, with defaults, and keep
``schema_version`` 1: an event written before them still decodes (the LLM judge's
``prompt`` on a candidate, ``judge_*`` on scored turns, decisions and accepted
turns).

Decoding is strict: ``decode(kind, raw_bytes)`` raises ``ContractError`` with a
precise message for non-UTF-8 bytes, invalid JSON, a null value, an unknown
schema version, missing or mistyped fields, and empty or oversized text.

Bounds (checked before anything reaches an engine, so an event that breaks them
is dead-lettered and never wedges a worker):

* the raw value: at most ``admission.max_event_bytes`` bytes (512 KiB) and JSON
  nesting at most ``MAX_JSON_DEPTH`` (16) deep, both checked *before* parsing;
* every string field of every record has a maximum, listed in ``FIELD_LIMITS``:
  ids (``turn_id``, ``conversation_id``, neighbour and model ids) at most
  ``ID_MAX_BYTES`` (256) UTF-8 bytes, well under the index's 512-byte keys; names
  (producer, generator, embedder, scorer, judge) ``NAME_MAX_BYTES`` (256); ``source``
  64; message texts and prompts ``admission.max_event_chars`` characters;
* every string must be valid UTF-8: a lone surrogate (``"\ud800"`` in the JSON)
  is a contract error, never a crash when the record is encoded again.

The modules: ``topics`` (topic names, ``SCHEMA_VERSION``), ``records`` (the faust
records), ``limits`` (the bounds above and ``FIELD_LIMITS``), ``codec`` (``encode``
and the strict ``decode_*``), ``deadletter``, ``reasons`` (the one ``Reason`` enum)
and ``decisions`` (the admitter's decision log row and counting decisions). Import
from ``corpusfactory.contract``: every public name is re-exported here.
"""

from __future__ import annotations

from corpusfactory.contract.codec import (
    decode_accepted,
    decode_build,
    decode_candidate,
    decode_decision,
    decode_evaluation,
    decode_json,
    decode_scored,
    decode_snapshot,
    encode,
    json_depth_exceeds,
    validate_candidate,
)
from corpusfactory.contract.deadletter import dead_letter
from corpusfactory.contract.decisions import (
    DecisionCounts,
    DecisionLogRow,
    count_decisions,
    first_decisions,
    prefer_decision,
)
from corpusfactory.contract.limits import (
    DEAD_VALUE_MAX_BYTES,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_EVENT_CHARS,
    ERROR_MAX_CHARS,
    FIELD_LIMITS,
    ID_MAX_BYTES,
    JUDGE_MAX_SCORE,
    JUDGE_ON_UNPARSED,
    JUDGE_OUTPUT_CHARS,
    MAX_JSON_DEPTH,
    NAME_MAX_BYTES,
    ROLES,
    SOURCE_MAX_BYTES,
)
from corpusfactory.contract.reasons import Reason
from corpusfactory.contract.records import (
    AcceptedConversation,
    AcceptedTurn,
    BuildPublished,
    CandidateTurn,
    DeadLetter,
    Decision,
    EvaluationPublished,
    R,
    ScoredTurn,
    SnapshotPublished,
)
from corpusfactory.contract.topics import (
    ACCEPTED,
    ALL_TOPICS,
    BUILDS,
    CANDIDATES,
    DEADLETTER,
    DECISIONS,
    EVALUATIONS,
    SCHEMA_VERSION,
    SCORED,
    SINGLE_PARTITION_TOPICS,
    SNAPSHOTS,
)
from corpusfactory.errors import ContractError

__all__ = [
    "ACCEPTED",
    "ALL_TOPICS",
    "BUILDS",
    "CANDIDATES",
    "DEADLETTER",
    "DEAD_VALUE_MAX_BYTES",
    "DECISIONS",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_EVENT_CHARS",
    "ERROR_MAX_CHARS",
    "EVALUATIONS",
    "FIELD_LIMITS",
    "ID_MAX_BYTES",
    "JUDGE_MAX_SCORE",
    "JUDGE_ON_UNPARSED",
    "JUDGE_OUTPUT_CHARS",
    "MAX_JSON_DEPTH",
    "NAME_MAX_BYTES",
    "ROLES",
    "SCHEMA_VERSION",
    "SCORED",
    "SINGLE_PARTITION_TOPICS",
    "SNAPSHOTS",
    "SOURCE_MAX_BYTES",
    "AcceptedConversation",
    "AcceptedTurn",
    "BuildPublished",
    "CandidateTurn",
    "ContractError",
    "DeadLetter",
    "Decision",
    "DecisionCounts",
    "DecisionLogRow",
    "EvaluationPublished",
    "R",
    "Reason",
    "ScoredTurn",
    "SnapshotPublished",
    "count_decisions",
    "dead_letter",
    "decode_accepted",
    "decode_build",
    "decode_candidate",
    "decode_decision",
    "decode_evaluation",
    "decode_json",
    "decode_scored",
    "decode_snapshot",
    "encode",
    "first_decisions",
    "json_depth_exceeds",
    "prefer_decision",
    "validate_candidate",
]
