"""The one ``Reason`` enum: why a turn was accepted or rejected."""

from __future__ import annotations

from enum import StrEnum


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
