"""The admitter's decision log row, and counting decisions (each turn once)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corpusfactory.contract.reasons import Reason
from corpusfactory.errors import ContractError

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
