"""Encoding records and strict decoding: bytes to validated records, or ``ContractError``."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import faust

from corpusfactory.contract.limits import (
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_EVENT_CHARS,
    FIELD_LIMITS,
    JUDGE_MAX_SCORE,
    JUDGE_ON_UNPARSED,
    MAX_JSON_DEPTH,
    ROLES,
)
from corpusfactory.contract.reasons import _REASON_VALUES
from corpusfactory.contract.records import (
    AcceptedConversation,
    AcceptedTurn,
    BuildPublished,
    CandidateTurn,
    Decision,
    EvaluationPublished,
    ScoredTurn,
    SnapshotPublished,
    _Record,
)
from corpusfactory.contract.topics import SCHEMA_VERSION
from corpusfactory.errors import ContractError

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


def _bad_turn() -> AcceptedTurn:
    raise ContractError("accepted conversation: every turn must be an object")
