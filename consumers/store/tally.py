"""The corpus store's in-memory indexes and aggregates (dedupe and ``stats()``) and the
quantiles its statistics report."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corpusfactory.contract import prefer_decision

QUANTILES = (("p10", 0.10), ("p25", 0.25), ("p50", 0.50), ("p75", 0.75), ("p90", 0.90))


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


@dataclass
class Tally:
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
