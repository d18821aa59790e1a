"""The admission decision as plain functions: no Kafka, no Milvus, no models."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from corpusfactory.contract import Reason
from corpusfactory.engines.index import Neighbour
from streams.decisions import (
    Candidate,
    decide,
    decide_batch,
    precheck,
    scored_precheck,
)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def cand(ref: str, vec: np.ndarray, nll: float = 1.0, pre: str = "", th: float = 2.0) -> Candidate:
    return Candidate(ref=ref, vector=vec, nll=nll, precheck=pre, nll_threshold=th)


def test_precheck_reasons_in_order() -> None:
    assert precheck("   \n", max_chars=10) == Reason.EMPTY
    assert precheck("x" * 11, max_chars=10) == Reason.TOO_LONG
    assert precheck("ciao", max_chars=10, too_long_tokens=True) == Reason.TOO_LONG
    assert precheck("ciao", max_chars=10, language_ok=False) == Reason.WRONG_LANGUAGE
    assert precheck("ciao", max_chars=10) == ""


def test_decide_duplicate_before_quality_and_strict_threshold() -> None:
    c = cand("a", unit(1, 0), nll=5.0)
    assert decide(c, Neighbour("s", 0.95), 0.9) == (False, Reason.DUPLICATE)
    assert decide(c, Neighbour("s", 0.5), 0.9) == (False, Reason.LOW_QUALITY)
    good = cand("b", unit(1, 0), nll=1.99)
    # cosine must be strictly above the threshold to reject
    assert decide(good, Neighbour("s", 0.9), 0.9) == (True, Reason.ACCEPTED)
    assert decide(good, None, 0.9) == (True, Reason.ACCEPTED)
    assert decide(cand("c", unit(1, 0), nll=2.0), None, 0.9) == (False, Reason.LOW_QUALITY)
    assert decide(cand("d", unit(1, 0), nll=math.nan), None, 0.9) == (False, Reason.LOW_QUALITY)
    assert decide(cand("e", unit(1, 0), pre=Reason.EMPTY), None, 0.9) == (False, Reason.EMPTY)


def test_batch_compares_with_turns_accepted_earlier_in_the_batch() -> None:
    a = cand("a", unit(1, 0, 0))
    a2 = cand("a2", unit(1, 0.05, 0))  # near-duplicate of a, not yet in the index
    b = cand("b", unit(0, 1, 0))
    verdicts = decide_batch([a, a2, b], [None, None, None], set(), 0.9)
    assert [v.accepted for v in verdicts] == [True, False, True]
    assert verdicts[1].reason == Reason.DUPLICATE
    assert verdicts[1].neighbour == "a"
    assert verdicts[1].similarity == pytest.approx(float(a.vector @ a2.vector), abs=1e-6)


def test_rejected_turn_is_not_a_neighbour_for_later_turns() -> None:
    low = cand("low", unit(1, 0), nll=9.0)
    twin = cand("twin", unit(1, 0.01), nll=1.0)
    verdicts = decide_batch([low, twin], [None, None], set(), 0.9)
    assert [v.reason for v in verdicts] == [Reason.LOW_QUALITY, Reason.ACCEPTED]


def test_index_neighbour_beats_weaker_batch_neighbour() -> None:
    a = cand("a", unit(1, 0, 0))
    b = cand("b", unit(0.6, 0.8, 0))
    verdicts = decide_batch([a, b], [None, Neighbour("seed:x", 0.97)], set(), 0.9)
    assert verdicts[1].reason == Reason.DUPLICATE
    assert verdicts[1].neighbour == "seed:x"


def test_replay_of_accepted_turn_is_accepted_again_without_write() -> None:
    a = cand("a", unit(1, 0))
    verdicts = decide_batch([a], [Neighbour("seed:y", 0.3)], {"a"}, 0.9)
    assert verdicts[0].accepted and verdicts[0].replayed
    assert verdicts[0].neighbour == "seed:y"


def test_same_turn_twice_in_a_batch_gets_the_same_verdict() -> None:
    a = cand("a", unit(1, 0))
    bad = cand("bad", unit(0, 1), nll=7.0)
    verdicts = decide_batch([a, bad, a, bad], [None] * 4, set(), 0.9)
    assert [(v.accepted, v.replayed) for v in verdicts] == [
        (True, False),
        (False, False),
        (True, True),
        (False, False),
    ]
    assert verdicts[2].neighbour == verdicts[0].neighbour


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        decide_batch([cand("a", unit(1, 0))], [], set(), 0.9)


def test_turns_to_write_are_the_accepted_not_replayed_ones() -> None:
    # what the admitter upserts: a turn twice in a batch, or already indexed, is written once
    a, b = cand("a", unit(1, 0)), cand("b", unit(0, 1))
    verdicts = decide_batch([a, b, a], [None] * 3, {"b"}, 0.9)
    assert [v.ref for v in verdicts if v.accepted and not v.replayed] == ["a"]


def test_contamination_comes_after_prechecks_and_before_duplicates() -> None:
    v = np.array([1.0, 0.0], dtype=np.float32)
    close_eval = Neighbour("eval:squad_it:q:1", 0.95)
    far_eval = Neighbour("eval:squad_it:q:2", 0.5)
    dup = Neighbour("turn-x", 0.99)
    assert decide(cand("a", v, pre="empty"), dup, 0.9, close_eval, 0.9) == (False, "empty")
    assert decide(cand("a", v), dup, 0.9, close_eval, 0.9) == (False, "contaminated")
    assert decide(cand("a", v), dup, 0.9, far_eval, 0.9) == (False, "duplicate")
    assert decide(cand("a", v), None, 0.9, far_eval, 0.9) == (True, "accepted")
    # exactly at the threshold is not "too close" (the rule is cosine > threshold)
    assert decide(cand("a", v), None, 0.9, Neighbour("e", 0.9), 0.9) == (True, "accepted")


def test_a_contaminated_turn_reports_the_evaluation_item_and_is_not_kept_in_the_batch() -> None:
    v = np.array([1.0, 0.0], dtype=np.float32)
    verdicts = decide_batch(
        [cand("a", v), cand("b", v)],
        [None, None],
        set(),
        0.9,
        reserved=[Neighbour("eval:ami2020:7", 0.97), None],
        contamination_threshold=0.9,
    )
    assert [(x.reason, x.neighbour, x.similarity) for x in verdicts] == [
        ("contaminated", "eval:ami2020:7", 0.97),
        ("accepted", "", 0.0),  # "a" was rejected, so "b" is no duplicate of it
    ]
    with pytest.raises(ValueError, match="reserved"):
        decide_batch([cand("a", v)], [None], set(), 0.9, reserved=[])


def judged(
    ref: str,
    vec: np.ndarray,
    score: float | None,
    threshold: float = 3.0,
    on_unparsed: str = "reject",
    nll: float = 1.0,
) -> Candidate:
    return Candidate(
        ref=ref,
        vector=vec,
        nll=nll,
        precheck="",
        nll_threshold=2.0,
        judged=True,
        judge_score=score,
        judge_threshold=threshold,
        judge_on_unparsed="accept" if on_unparsed == "accept" else "reject",
    )


def test_judge_reasons_are_contract_reasons() -> None:
    assert {Reason.JUDGE_LOW, Reason.JUDGE_UNPARSED} <= set(Reason)


def test_the_judge_comes_last_after_every_other_filter() -> None:
    v = unit(1, 0)
    low = judged("a", v, 1.0)
    assert decide(low, None, 0.9) == (False, Reason.JUDGE_LOW)
    # every earlier filter wins over the judge's low score
    assert decide(judged("a", v, 1.0, nll=5.0), None, 0.9) == (False, Reason.LOW_QUALITY)
    assert decide(low, Neighbour("s", 0.95), 0.9) == (False, Reason.DUPLICATE)
    assert decide(low, None, 0.9, Neighbour("eval:x", 0.95), 0.9) == (False, "contaminated")
    assert decide(replace(low, precheck=Reason.EMPTY), None, 0.9) == (False, Reason.EMPTY)


def test_judge_threshold_is_inclusive_and_configurable() -> None:
    v = unit(1, 0)
    assert decide(judged("a", v, 3.0), None, 0.9) == (True, Reason.ACCEPTED)  # score >= threshold
    assert decide(judged("a", v, 2.5), None, 0.9) == (False, Reason.JUDGE_LOW)
    assert decide(judged("a", v, 2.5, threshold=2.5), None, 0.9) == (True, Reason.ACCEPTED)
    assert decide(judged("a", v, 0.0, threshold=0.0), None, 0.9) == (True, Reason.ACCEPTED)
    assert decide(judged("a", v, 4.5, threshold=5.0), None, 0.9) == (False, Reason.JUDGE_LOW)


def test_an_unreadable_verdict_follows_on_unparsed() -> None:
    v = unit(1, 0)
    assert decide(judged("a", v, None), None, 0.9) == (False, Reason.JUDGE_UNPARSED)
    assert decide(judged("a", v, None, on_unparsed="accept"), None, 0.9) == (True, Reason.ACCEPTED)
    # an accepted unparsed turn still meets the other filters
    assert decide(judged("a", v, None, on_unparsed="accept", nll=3.0), None, 0.9) == (
        False,
        Reason.LOW_QUALITY,
    )


def test_a_turn_the_judge_did_not_rate_is_decided_without_it() -> None:
    v = unit(1, 0)
    # judged=False: no score is no verdict (a user turn, or the judge is off)
    assert decide(cand("u", v), None, 0.9) == (True, Reason.ACCEPTED)
    not_judged = replace(judged("u", v, None), judged=False)
    assert decide(not_judged, None, 0.9) == (True, Reason.ACCEPTED)


def test_a_turn_the_judge_rejected_is_no_neighbour_for_later_turns() -> None:
    low = judged("low", unit(1, 0), 0.5)
    twin = judged("twin", unit(1, 0.01), 4.0)
    verdicts = decide_batch([low, twin], [None, None], set(), 0.9)
    assert [v.reason for v in verdicts] == [Reason.JUDGE_LOW, Reason.ACCEPTED]
    # a replayed turn (already in the index) is accepted again whatever its new score
    again = decide_batch([judged("low", unit(1, 0), 0.5)], [None], {"low"}, 0.9)
    assert (again[0].accepted, again[0].replayed) == (True, True)


def test_a_pre_checked_out_turn_after_an_accepted_one_in_the_same_batch() -> None:
    # A turn rejected before scoring has no embedding: it must not be compared with
    # the turns accepted earlier in its batch (that used to raise, sinking the batch).
    a = cand("a", unit(1, 0))
    empty = cand("e", np.zeros(0, dtype=np.float32), pre=Reason.EMPTY)
    verdicts = decide_batch([a, empty], [None, None], set(), 0.9)
    assert [(v.accepted, v.reason, v.neighbour) for v in verdicts] == [
        (True, Reason.ACCEPTED, ""),
        (False, Reason.EMPTY, ""),
    ]


def test_scored_precheck_sets_too_long_and_empty_after_scoring() -> None:
    assert scored_precheck(tokens=12, too_long=False, nll=3.5) == ""
    assert scored_precheck(tokens=600, too_long=True, nll=3.5) == Reason.TOO_LONG
    assert scored_precheck(tokens=0, too_long=False, nll=0.0) == Reason.EMPTY
    assert scored_precheck(tokens=4, too_long=False, nll=float("nan")) == Reason.EMPTY
    assert scored_precheck(tokens=4, too_long=False, nll=float("inf")) == Reason.EMPTY
