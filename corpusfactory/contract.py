"""The event contract: topic names and the typed records written to them.

This module is the project's public contract. Any producer may write
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
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import faust

from corpusfactory.errors import ContractError

SCHEMA_VERSION = 1

CANDIDATES = "turns.candidates"
SCORED = "turns.scored"
DECISIONS = "turns.decisions"
ACCEPTED = "corpus.accepted"
DEADLETTER = "turns.deadletter"
SNAPSHOTS = "models.snapshots"
EVALUATIONS = "models.evaluations"
BUILDS = "models.builds"
ALL_TOPICS = (
    CANDIDATES, SCORED, DECISIONS, ACCEPTED, DEADLETTER, SNAPSHOTS, EVALUATIONS, BUILDS,
)  # fmt: skip
# Low-volume topics whose order matters more than their throughput.
SINGLE_PARTITION_TOPICS = (SCORED, SNAPSHOTS, EVALUATIONS, BUILDS)

ROLES = ("user", "assistant")


class Reason(StrEnum):
    """Why a turn was decided as it was: "accepted", or why it was rejected.

    Defined once, here; decisions, the scorer's prechecks, the judge, metrics, the corpus
    store and the report all use it (a member is its string, so the events carry it as
    a plain string). Set only in ``streams/decisions.py`` and the judge's verdict."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # cosine above admission.similarity_threshold to an admitted turn
    LOW_QUALITY = "low_quality"  # MLM NLL at or above the threshold
    EMPTY = "empty"
    TOO_LONG = "too_long"
    WRONG_LANGUAGE = "wrong_language"
    CONTAMINATED = "contaminated"  # too close to an evaluation item
    JUDGE_LOW = "judge_low"  # the LLM judge's score is below judge.threshold
    JUDGE_UNPARSED = "judge_unparsed"  # the judge's output held no readable score


_REASON_VALUES = frozenset(r.value for r in Reason)
JUDGE_ON_UNPARSED = ("reject", "accept")

# --------------------------------------------------------------------------- the decision log


@dataclass(frozen=True)
class DecisionLogRow:
    """What the admitter logs for a decided turn (in the index's decision log), so a
    redelivered or resent turn is answered again with the same decision.

    Stored as JSON; :meth:`from_dict` reads rows written by earlier versions (before
    the judge: no ``judge*`` fields; before conflict checks: no ``text_sha``) and
    ignores fields it does not know."""

    accepted: bool
    reason: str
    neighbour_id: str
    similarity: float
    nll: float
    tokens: int
    nll_threshold: float
    similarity_threshold: float
    replayed: bool = False
    judge_score: float | None = None
    judge_threshold: float | None = None
    judge: str = ""
    text_sha: str | None = None  # xxh64 of the decided text; None in rows from before
    nll_lower_bound: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionLogRow:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ContractError(f"unreadable decision log row: {exc}") from None


# --------------------------------------------------------------------------- counting decisions


def prefer_decision(prev: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """The one rule for a turn decided more than once: its decision is its first
    non-replayed record, else (only replays were seen) its first record.

    A replayed decision repeats the first one (the admitter answers a redelivered
    or resent turn with what it decided before), so counting it again would count
    the turn twice. Used by the corpus store, the report and the producers.
    """
    return prev is None or (bool(prev.get("replayed")) and not bool(new.get("replayed")))


def first_decisions(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One decision record per ``turn_id`` (:func:`prefer_decision`), in first-seen order."""
    chosen: dict[str, dict[str, Any]] = {}
    for rec in records:
        tid = str(rec["turn_id"])
        if prefer_decision(chosen.get(tid), rec):
            chosen[tid] = dict(rec)
    return list(chosen.values())


@dataclass(frozen=True)
class DecisionCounts:
    """Decided turns (each once), accepted, and every reason (the contract's at 0 too)."""

    decided: int
    accepted: int
    by_reason: dict[str, int]

    @property
    def rejected(self) -> int:
        return self.decided - self.accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.decided if self.decided else None


def count_decisions(records: Iterable[Mapping[str, Any]]) -> DecisionCounts:
    """Count decision records (dicts with ``turn_id``, ``accepted``, ``reason`` and
    optionally ``replayed``), each turn once by :func:`prefer_decision`.

    ``by_reason`` lists every :class:`Reason` (zeros included) in the enum's order,
    then any reason this version does not know, sorted."""
    chosen = first_decisions(records)
    found = Counter(str(d["reason"]) for d in chosen)
    by_reason = {r.value: found.pop(r.value, 0) for r in Reason}
    by_reason.update(sorted(found.items()))
    accepted = sum(1 for d in chosen if d.get("accepted"))
    return DecisionCounts(decided=len(chosen), accepted=accepted, by_reason=by_reason)


JUDGE_MAX_SCORE = 5.0
JUDGE_OUTPUT_CHARS = 500  # how much of the judge's raw output a scored turn keeps

# Bounds of the contract (see the module docstring).
ID_MAX_BYTES = 256  # turn, conversation, neighbour, snapshot and model ids
NAME_MAX_BYTES = 256  # producer, generator, embedder, scorer, judge ids
SOURCE_MAX_BYTES = 64
MAX_JSON_DEPTH = 16  # the deepest record (a scored turn's candidate) needs 3
DEFAULT_MAX_EVENT_BYTES = 512 * 1024
DEFAULT_MAX_EVENT_CHARS = 20_000
ERROR_MAX_CHARS = 2000  # a dead letter's error message
DEAD_VALUE_MAX_BYTES = 64 * 1024  # how much of a bad event a dead letter keeps


class _Record(faust.Record, serializer="json", include_metadata=False, abstract=True):
    """Base of every contract record: JSON, no faust metadata on the wire."""


class CandidateTurn(_Record):
    """A generated message offered for admission."""

    schema_version: int
    turn_id: str
    conversation_id: str
    index: int  # position of the message in its conversation, from 0
    role: str  # "user" | "assistant"
    text: str
    source: str = "selfchat"
    producer_id: str = ""
    generator: str = ""
    attempt: int = 0  # 0 for the first try at this position, then 1, 2, ...
    created_at: float = 0.0
    # For an assistant turn: the user turn it answers, which the optional LLM judge
    # reads as the instruction. "" when unknown (such a turn is not judged).
    prompt: str = ""


class ScoredTurn(_Record):
    """A candidate with its embedding and quality score (internal topic)."""

    schema_version: int
    candidate: CandidateTurn
    precheck: str  # "" when the text may be admitted, else a rejection reason
    embedding: list[float]
    nll: float
    tokens: int
    embedder: str
    scorer: str
    nll_threshold: float
    stage_s: dict[str, float] | None = None  # this turn's share of each stage's time
    origin_partition: int = -1
    origin_offset: int = -1
    scored_at: float = 0.0
    # The optional LLM judge (judge.*): judged is True when it rated this turn;
    # judge_score is the parsed 0-5 score, None when not judged or unreadable.
    judged: bool = False
    judge_score: float | None = None
    judge_threshold: float = 0.0
    judge_on_unparsed: str = "reject"
    judge: str = ""  # the judge generator's id
    judge_output: str = ""  # the start of the judge's raw output, for audit
    # admission.nll_early_stop: scoring stopped once the turn was certainly at or over
    # the threshold, so nll is a lower bound of its NLL (the decision is exact).
    nll_lower_bound: bool = False


class Decision(_Record):
    """The admission decision for one candidate turn."""

    schema_version: int
    turn_id: str
    conversation_id: str
    index: int
    accepted: bool
    reason: str
    neighbour_id: str  # turn id (or seed id) of the nearest stored message, "" if none
    similarity: float  # cosine with that neighbour, 0.0 if none
    nll: float
    tokens: int
    embedder: str
    scorer: str
    similarity_threshold: float
    nll_threshold: float
    replayed: bool = False  # True when the turn was decided before: this repeats that decision
    decided_at: float = 0.0
    stage_s: dict[str, float] | None = None  # seconds per stage: embed, score, judge, admit
    # The optional LLM judge: its 0-5 score (None when the turn was not judged or its
    # output was unreadable), the threshold in force and the judge's id (None and ""
    # when the turn was not judged).
    judge_score: float | None = None
    judge_threshold: float | None = None
    judge: str = ""
    # The candidate's source (selfchat, fauno, ...): NLL by corpus in metrics and reports.
    source: str = ""
    nll_lower_bound: bool = False  # nll is a lower bound (admission.nll_early_stop)


class AcceptedTurn(_Record):
    """One message of an accepted conversation, with its admission metadata."""

    turn_id: str
    role: str
    text: str
    nll: float
    similarity: float
    neighbour_id: str
    embedder: str
    scorer: str
    judge_score: float | None = None  # the LLM judge's 0-5 score, None when not judged


class AcceptedConversation(_Record):
    """A finished conversation: every message accepted, in order."""

    schema_version: int
    conversation_id: str
    source: str
    turns: list[AcceptedTurn]
    target_length: int
    truncated: bool = False
    producer_id: str = ""
    generator: str = ""
    finished_at: float = 0.0


class DeadLetter(_Record):
    """An event that could not be decoded, validated or processed."""

    schema_version: int
    origin_topic: str
    origin_partition: int
    origin_offset: int
    key: str | None  # the original key, decoded as UTF-8 with replacement
    value: str | None  # the original bytes as text (UTF-8 with replacement), None for null
    error: str
    error_type: str
    stage: str  # "decode" | "score" | "admit" | "producer"
    at: float = 0.0


class SnapshotPublished(_Record):
    """A fine-tuning snapshot is complete on disk (its manifest holds the details)."""

    schema_version: int
    snapshot_id: str
    parent: str  # "" when trained from the base model
    base_model: str
    path: str
    conversations: int
    created_at: float = 0.0


class EvaluationPublished(_Record):
    """One evaluation task's results for a snapshot (or "base", the base model)."""

    schema_version: int
    model_id: str
    task: str
    results: dict[str, Any]
    path: str  # the results file, next to its per-item predictions
    evaluated_at: float = 0.0


class BuildPublished(_Record):
    """A GGUF build of a snapshot and its quality gate (published only if it passed)."""

    schema_version: int
    snapshot_id: str
    quant: str  # "F16", "Q8_0", "Q4_K_M", ...
    path: str
    size_bytes: int
    gate: dict[str, Any]
    published: bool
    built_at: float = 0.0


R = TypeVar("R", bound=_Record)

# The maximum of every string field of every record: ("bytes", n) counts UTF-8
# bytes, ("chars", n) characters, ("text", None) the event's text limit
# (admission.max_event_chars). A test checks that no string field is missing.
_ID = ("bytes", ID_MAX_BYTES)
_NAME = ("bytes", NAME_MAX_BYTES)
_TEXT = ("text", None)
FIELD_LIMITS: dict[str, dict[str, tuple[str, int | None]]] = {
    "CandidateTurn": {
        "turn_id": _ID,
        "conversation_id": _ID,
        "role": ("bytes", 16),
        "text": _TEXT,
        "source": ("bytes", SOURCE_MAX_BYTES),
        "producer_id": _NAME,
        "generator": _NAME,
        "prompt": _TEXT,
    },
    "ScoredTurn": {
        "precheck": ("bytes", 32),
        "embedder": _NAME,
        "scorer": _NAME,
        "judge_on_unparsed": ("bytes", 16),
        "judge": _NAME,
        "judge_output": ("chars", JUDGE_OUTPUT_CHARS),
    },
    "Decision": {
        "turn_id": _ID,
        "conversation_id": _ID,
        "reason": ("bytes", 32),
        "neighbour_id": ("bytes", 2 * ID_MAX_BYTES),  # a turn id, or "seed:"/"eval:" + an id
        "embedder": _NAME,
        "scorer": _NAME,
        "judge": _NAME,
        "source": ("bytes", SOURCE_MAX_BYTES),
    },
    "AcceptedTurn": {
        "turn_id": _ID,
        "role": ("bytes", 16),
        "text": _TEXT,
        "neighbour_id": ("bytes", 2 * ID_MAX_BYTES),
        "embedder": _NAME,
        "scorer": _NAME,
    },
    "AcceptedConversation": {
        "conversation_id": _ID,
        "source": ("bytes", SOURCE_MAX_BYTES),
        "producer_id": _NAME,
        "generator": _NAME,
    },
    "DeadLetter": {
        "origin_topic": ("bytes", 249),  # Kafka's own limit on topic names
        "key": ("bytes", DEAD_VALUE_MAX_BYTES),
        "value": ("bytes", DEAD_VALUE_MAX_BYTES),
        "error": ("chars", ERROR_MAX_CHARS),
        "error_type": ("bytes", 128),
        "stage": ("bytes", 32),
    },
    "SnapshotPublished": {
        "snapshot_id": _ID,
        "parent": _ID,
        "base_model": ("bytes", 4096),
        "path": ("bytes", 4096),
    },
    "EvaluationPublished": {"model_id": _ID, "task": _NAME, "path": ("bytes", 4096)},
    "BuildPublished": {
        "snapshot_id": _ID,
        "quant": ("bytes", 32),
        "path": ("bytes", 4096),
    },
}

_REQUIRED_TEXT = {CandidateTurn}


def encode(record: _Record) -> bytes:
    """The wire form of a record: compact UTF-8 JSON."""
    return json.dumps(_plain(record), ensure_ascii=False).encode("utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, faust.Record):
        return {k: _plain(v) for k, v in value.asdict().items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_TYPES: dict[type, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
}
# Optional fields: null or one of these.
_OPTIONAL_TYPES: dict[Any, tuple[type, ...]] = {
    str | None: (str,),
    float | None: (int, float),
}


def _check_fields(
    cls: type[_Record], data: dict[str, Any], where: str, max_chars: int = DEFAULT_MAX_EVENT_CHARS
) -> dict[str, Any]:
    fields = cls._options.fields  # name -> annotation
    defaults = cls._options.defaults
    limits = FIELD_LIMITS.get(cls.__name__, {})
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, ann in fields.items():
        if name not in data:
            if name in defaults:
                continue
            problems.append(f"missing field {name!r}")
            continue
        value = data[name]
        out[name] = value
        expected = _TYPES.get(ann)
        if expected is None and value is not None:
            expected = _OPTIONAL_TYPES.get(ann)
        if expected is not None:
            if isinstance(value, bool) and bool not in expected:
                problems.append(f"field {name!r} must be {_type_name(ann)}, got bool")
            elif not isinstance(value, expected):
                problems.append(
                    f"field {name!r} must be {_type_name(ann)}, got {type(value).__name__}"
                )
            elif isinstance(value, int | float) and not math.isfinite(value):
                problems.append(f"field {name!r} must be finite")
            elif isinstance(value, str):
                problem = _string_problem(value, limits.get(name), max_chars)
                if problem:
                    problems.append(f"field {name!r} {problem}")
    if problems:
        raise ContractError(f"{where}: " + "; ".join(problems))
    return out


def _string_problem(value: str, limit: tuple[str, int | None] | None, max_chars: int) -> str:
    """Why a string field breaks the contract ("" when it does not)."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 (a lone surrogate at character {exc.start})"
    if limit is None:
        return ""
    unit, most = limit
    if unit == "text":
        if len(value) > max_chars:
            return f"has {len(value)} characters, over the event limit {max_chars}"
        return ""
    have = size if unit == "bytes" else len(value)
    if most is not None and have > most:
        what = "bytes (UTF-8)" if unit == "bytes" else "characters"
        return f"has {have} {what}, over its limit {most}"
    return ""


def _type_name(ann: Any) -> str:
    return ann.__name__ if isinstance(ann, type) else str(ann)


def _check_judge_score(value: Any, where: str) -> None:
    if value is not None and not 0.0 <= value <= JUDGE_MAX_SCORE:
        raise ContractError(f"{where}: judge_score must be within 0..5 or null, got {value!r}")


def validate_candidate(data: dict[str, Any], max_chars: int) -> CandidateTurn:
    """Build a CandidateTurn from decoded JSON, checking every field."""
    fields = _check_fields(CandidateTurn, data, "candidate turn", max_chars)
    for name in ("turn_id", "conversation_id"):
        if not fields[name].strip():
            raise ContractError(f"candidate turn: field {name!r} must not be empty")
    if fields["role"] not in ROLES:
        raise ContractError(f"candidate turn: role must be one of {ROLES}, got {fields['role']!r}")
    if fields["index"] < 0:
        raise ContractError("candidate turn: index must be >= 0")
    text = fields["text"]
    # Only a missing text is a contract violation; whitespace-only text is decided
    # (reason "empty") and long text under the event limit too (reason "too_long").
    if text == "":
        raise ContractError("candidate turn: text is empty")
    return CandidateTurn(**fields)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects deeper than ``limit``.

    Checked on the bytes before parsing, so a value of 100,000 nested lists costs
    a scan, not a RecursionError: brackets inside strings are skipped.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def decode_json(
    raw: bytes | None, what: str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> dict[str, Any]:
    """Bytes -> JSON object with a supported schema version, or ContractError.

    The size and the nesting depth are bounded before the bytes are parsed.
    """
    if raw is None:
        raise ContractError(f"{what}: null value (tombstone)")
    if len(raw) > max_bytes:
        raise ContractError(f"{what}: value has {len(raw)} bytes, over the limit {max_bytes}")
    if json_depth_exceeds(raw):
        raise ContractError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError(
            f"{what}: value is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"{what}: invalid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(data, dict):
        raise ContractError(f"{what}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ContractError(
            f"{what}: unknown schema_version {version!r} (this worker reads {SCHEMA_VERSION})"
        )
    return data


def decode_candidate(
    raw: bytes | None, max_chars: int, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> CandidateTurn:
    return validate_candidate(decode_json(raw, "candidate turn", max_bytes), max_chars)


def decode_decision(raw: bytes | None) -> Decision:
    data = decode_json(raw, "decision")
    fields = _check_fields(Decision, data, "decision")
    if fields["reason"] not in _REASON_VALUES:
        raise ContractError(f"decision: unknown reason {fields['reason']!r}")
    _check_judge_score(fields.get("judge_score"), "decision")
    return Decision(**fields)


def decode_scored(
    raw: bytes | None,
    max_chars: int = DEFAULT_MAX_EVENT_CHARS,
    max_bytes: int = 4 * DEFAULT_MAX_EVENT_BYTES,
) -> ScoredTurn:
    data = decode_json(raw, "scored turn", max_bytes)
    cand = data.get("candidate")
    if not isinstance(cand, dict):
        raise ContractError("scored turn: field 'candidate' must be an object")
    candidate = CandidateTurn(
        **_check_fields(CandidateTurn, cand, "scored turn candidate", max_chars)
    )
    fields = _check_fields(ScoredTurn, data, "scored turn")
    fields["candidate"] = candidate
    emb = fields["embedding"]
    if not isinstance(emb, list) or not all(isinstance(x, int | float) for x in emb):
        raise ContractError("scored turn: embedding must be a list of numbers")
    _check_judge_score(fields.get("judge_score"), "scored turn")
    if fields.get("judge_on_unparsed", "reject") not in JUDGE_ON_UNPARSED:
        raise ContractError(
            f"scored turn: judge_on_unparsed must be one of {JUDGE_ON_UNPARSED}, "
            f"got {fields['judge_on_unparsed']!r}"
        )
    if not 0.0 <= fields.get("judge_threshold", 0.0) <= JUDGE_MAX_SCORE:
        raise ContractError("scored turn: judge_threshold must be within 0..5")
    return ScoredTurn(**fields)


def decode_accepted(raw: bytes | None) -> AcceptedConversation:
    data = decode_json(raw, "accepted conversation")
    turns = data.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ContractError("accepted conversation: 'turns' must be a non-empty list")
    parsed = [
        AcceptedTurn(**_check_fields(AcceptedTurn, t, "accepted turn"))
        if isinstance(t, dict)
        else _bad_turn()
        for t in turns
    ]
    for t in parsed:
        _check_judge_score(t.judge_score, "accepted turn")
    fields = _check_fields(AcceptedConversation, data, "accepted conversation")
    fields["turns"] = parsed
    return AcceptedConversation(**fields)


def decode_snapshot(raw: bytes | None) -> SnapshotPublished:
    data = decode_json(raw, "snapshot announcement")
    return SnapshotPublished(**_check_fields(SnapshotPublished, data, "snapshot announcement"))


def decode_evaluation(raw: bytes | None) -> EvaluationPublished:
    data = decode_json(raw, "evaluation announcement")
    fields = _check_fields(EvaluationPublished, data, "evaluation announcement")
    if not isinstance(fields["results"], dict):
        raise ContractError("evaluation announcement: 'results' must be an object")
    return EvaluationPublished(**fields)


def decode_build(raw: bytes | None) -> BuildPublished:
    data = decode_json(raw, "build announcement")
    fields = _check_fields(BuildPublished, data, "build announcement")
    if not isinstance(fields["gate"], dict):
        raise ContractError("build announcement: 'gate' must be an object")
    return BuildPublished(**fields)


def _raw_text(raw: bytes) -> str:
    """Bytes as text for a dead letter: UTF-8 with replacement, cut to its limit."""
    text = raw.decode("utf-8", errors="replace")
    encoded = text.encode("utf-8")
    if len(encoded) > DEAD_VALUE_MAX_BYTES:
        head = encoded[: DEAD_VALUE_MAX_BYTES - 40].decode("utf-8", errors="ignore")
        text = f"{head}... [{len(raw)} bytes]"
    return text


def _clean(text: str, most: int) -> str:
    """A string that encodes as UTF-8 (lone surrogates escaped), cut to ``most`` chars."""
    text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return text if len(text) <= most else text[: most - 3] + "..."


def _bad_turn() -> AcceptedTurn:
    raise ContractError("accepted conversation: every turn must be an object")


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: BaseException | str,
    stage: str,
) -> DeadLetter:
    """A DeadLetter record describing where a bad event came from and why.

    It always encodes: the key and value are decoded with replacement and cut to
    ``DEAD_VALUE_MAX_BYTES``, the error to ``ERROR_MAX_CHARS``, and lone
    surrogates in the error (an exception quoting a bad id) are escaped.
    """
    return DeadLetter(
        schema_version=SCHEMA_VERSION,
        origin_topic=_clean(topic, 249),
        origin_partition=partition,
        origin_offset=offset,
        key=None if key is None else _raw_text(key),
        value=None if value is None else _raw_text(value),
        error=_clean(str(error), ERROR_MAX_CHARS),
        error_type=type(error).__name__ if isinstance(error, BaseException) else "Error",
        stage=stage,
        at=time.time(),
    )
