"""The admission decision, as plain functions (no Kafka, no Milvus, no models).

``precheck`` runs in the scorer on the raw text; ``decide_batch`` runs in the
single admission writer on a batch of scored turns, in order, given each turn's
nearest stored neighbour. Rejection order follows the paper's loop: structural
checks (empty, too long, wrong language), then decontamination (cosine with a
reserved evaluation item > its threshold), then the diversity filter (cosine >
threshold), then the quality filter (NLL >= threshold), then, for a turn the
optional LLM judge rated, the judge's verdict (``judge_low``: score below
``judge.threshold``; ``judge_unparsed``: no readable score, rejected unless
``judge.on_unparsed`` is ``accept``). The judge is the most expensive check and
comes last; the scorer only runs it on turns that passed its own checks.

A batch is decided as if its turns arrived one by one: a turn is also compared
with the turns accepted earlier in the same batch, which are not in the index
yet. That keeps invariant I3 without a search-insert round trip per turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from corpusfactory.contract import Reason, ScoredTurn
from corpusfactory.engines.index import Neighbour
from streams.judge import OnUnparsed, judge_decision


@dataclass(frozen=True)
class Candidate:
    """What the writer knows of a scored turn."""

    ref: str  # the turn id
    vector: np.ndarray  # unit length
    nll: float
    precheck: str  # "" or a structural rejection reason
    nll_threshold: float  # reject when nll >= this (fixed, or a percentile computed by the scorer)
    judged: bool = False  # the LLM judge rated this turn
    judge_score: float | None = None  # its 0-5 score, None when unreadable (or not judged)
    judge_threshold: float = 0.0  # reject when judge_score < this
    judge_on_unparsed: OnUnparsed = "reject"

    @classmethod
    def from_scored(cls, ref: str, scored: ScoredTurn) -> Candidate:
        """The candidate the admitter decides for a scored turn (``ref``: its turn id)."""
        return cls(
            ref=ref,
            vector=np.asarray(scored.embedding, dtype=np.float32),
            nll=scored.nll,
            precheck=scored.precheck,
            nll_threshold=scored.nll_threshold,
            judged=scored.judged,
            judge_score=scored.judge_score,
            judge_threshold=scored.judge_threshold,
            judge_on_unparsed="accept" if scored.judge_on_unparsed == "accept" else "reject",
        )


@dataclass(frozen=True)
class Verdict:
    ref: str
    accepted: bool
    reason: str
    neighbour: str
    similarity: float
    replayed: bool = False


def precheck(
    text: str, *, max_chars: int, too_long_tokens: bool = False, language_ok: bool = True
) -> str:
    """A structural rejection reason for a text, or "" when it may be scored and admitted."""
    if not text.strip():
        return Reason.EMPTY
    if len(text) > max_chars or too_long_tokens:
        return Reason.TOO_LONG
    if not language_ok:
        return Reason.WRONG_LANGUAGE
    return ""


def scored_precheck(*, tokens: int, too_long: bool, nll: float) -> str:
    """A structural rejection reason found by the scorer, or "" when the NLL stands.

    A text longer than the scorer's window (``too_long``) is ``too_long``; one with no
    scorable token or a non-finite NLL (nothing left after tokenization) is ``empty``.
    """
    if too_long:
        return Reason.TOO_LONG
    if tokens == 0 or not math.isfinite(nll):
        return Reason.EMPTY
    return ""


def decide(
    cand: Candidate,
    nearest: Neighbour | None,
    similarity_threshold: float,
    reserved: Neighbour | None = None,
    contamination_threshold: float = 1.0,
) -> tuple[bool, str]:
    """(accepted, reason) for one turn given its nearest stored neighbour and its nearest
    reserved evaluation item."""
    if cand.precheck:
        return False, cand.precheck
    if reserved is not None and reserved.similarity > contamination_threshold:
        return False, Reason.CONTAMINATED
    if nearest is not None and nearest.similarity > similarity_threshold:
        return False, Reason.DUPLICATE
    if not math.isfinite(cand.nll) or cand.nll >= cand.nll_threshold:
        return False, Reason.LOW_QUALITY
    if cand.judged:
        passed, reason = judge_decision(
            cand.judge_score, cand.judge_threshold, cand.judge_on_unparsed
        )
        if not passed:
            return False, reason
    return True, Reason.ACCEPTED


def decide_batch(
    cands: Sequence[Candidate],
    nearest: Sequence[Neighbour | None],
    already_accepted: set[str],
    similarity_threshold: float,
    reserved: Sequence[Neighbour | None] | None = None,
    contamination_threshold: float = 1.0,
) -> list[Verdict]:
    """Decide a batch in order, as one writer would, one turn after another.

    ``nearest[i]`` is cands[i]'s nearest neighbour in the index, excluding the
    turn itself; ``reserved[i]`` its nearest evaluation item (None: no check). A
    contaminated turn reports that item as its neighbour. A turn already in the
    index (``already_accepted``) was accepted before (a replay or a redelivery after
    a crash): it is accepted again with ``replayed=True`` and nothing is written.
    """
    if len(cands) != len(nearest):
        raise ValueError("one nearest neighbour (or None) is needed per candidate")
    reserved = list(reserved) if reserved is not None else [None] * len(cands)
    if len(reserved) != len(cands):
        raise ValueError("one reserved neighbour (or None) is needed per candidate")
    verdicts: list[Verdict] = []
    first: dict[str, Verdict] = {}
    batch_refs: list[str] = []
    batch_vecs: list[np.ndarray] = []
    for cand, near, res in zip(cands, nearest, reserved, strict=True):
        if cand.ref in already_accepted:
            # Accepted in an earlier batch (a replay, or a redelivery after a crash):
            # repeat the acceptance, never write twice.
            verdicts.append(
                Verdict(
                    cand.ref,
                    True,
                    Reason.ACCEPTED,
                    near.ref if near else "",
                    near.similarity if near else 0.0,
                    replayed=True,
                )
            )
            continue
        if cand.ref in first:
            # The same turn twice in one batch: the same verdict again.
            prev = first[cand.ref]
            verdicts.append(replace(prev, replayed=prev.accepted))
            continue
        best = near
        if batch_vecs and not cand.precheck:  # a pre-checked-out turn has no vector
            sims = np.stack(batch_vecs) @ cand.vector
            j = int(np.argmax(sims))
            if best is None or float(sims[j]) > best.similarity:
                best = Neighbour(batch_refs[j], float(sims[j]))
        accepted, reason = decide(cand, best, similarity_threshold, res, contamination_threshold)
        shown = res if reason == Reason.CONTAMINATED else best
        verdict = Verdict(
            cand.ref,
            accepted,
            reason,
            shown.ref if shown else "",
            shown.similarity if shown else 0.0,
        )
        verdicts.append(verdict)
        first[cand.ref] = verdict
        if accepted:
            batch_refs.append(cand.ref)
            batch_vecs.append(cand.vector)
    return verdicts
