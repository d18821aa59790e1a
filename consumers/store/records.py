"""The records of the corpus store: an accepted conversation in the export schema, a
decision line, an undecodable event; JSON Lines encoding and the checks a line read
back must pass."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from corpusfactory.contract import AcceptedConversation, Decision
from corpusfactory.records import ExportLine


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
        "record_version": ExportLine.VERSION,
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


def line_digest(line: bytes) -> bytes:
    return hashlib.blake2b(line, digest_size=12).digest()


def valid_conversation(rec: dict[str, Any] | None) -> bool:
    return (
        rec is not None
        and isinstance(rec.get("conversation_id"), str)
        and isinstance(rec.get("turns"), list)
    )


def valid_decision(rec: dict[str, Any] | None) -> bool:
    return (
        rec is not None
        and isinstance(rec.get("turn_id"), str)
        and isinstance(rec.get("accepted"), bool)
        and isinstance(rec.get("reason"), str)
        and isinstance(rec.get("nll"), int | float)
    )
