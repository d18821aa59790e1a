"""The event contract: round trips and strict decoding."""

from __future__ import annotations

import json
import re

import pytest

from corpusfactory import contract
from corpusfactory.contract import ContractError, Reason


def cand(**kw) -> contract.CandidateTurn:
    base = dict(
        schema_version=1,
        turn_id="c1:0:0",
        conversation_id="c1",
        index=0,
        role="user",
        text="Ciao, come stai?",
    )
    base.update(kw)
    return contract.CandidateTurn(**base)


def test_candidate_round_trip_is_plain_json() -> None:
    raw = contract.encode(cand(text="Perché è così? 🙂"))
    data = json.loads(raw)
    assert "__faust" not in data  # the wire format is the documented fields only
    assert data["text"] == "Perché è così? 🙂"
    assert contract.decode_candidate(raw, 1000) == cand(text="Perché è così? 🙂")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "null value"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"schema_version": 1,', "invalid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"schema_version": 2}', "unknown schema_version 2"),
        (b'{"turn_id": "x"}', "unknown schema_version None"),
    ],
)
def test_undecodable_bytes(raw: bytes | None, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        contract.decode_candidate(raw, 1000)


def _raw(**overrides) -> bytes:
    data = json.loads(contract.encode(cand()))
    for k, v in overrides.items():
        if v is ...:
            del data[k]
        else:
            data[k] = v
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"role": ...}, "missing field 'role'"),
        ({"index": "0"}, "field 'index' must be int"),
        ({"index": True}, "got bool"),
        ({"index": -1}, "index must be >= 0"),
        ({"role": "system"}, "role must be one of"),
        ({"turn_id": "  "}, "'turn_id' must not be empty"),
        ({"text": ""}, "text is empty"),
        ({"text": "x" * 101}, "over the event limit 100"),
        ({"created_at": float("nan")}, "must be finite"),
    ],
)
def test_invalid_candidates(overrides: dict, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        contract.decode_candidate(_raw(**overrides), 100)


def test_whitespace_text_is_valid_and_left_to_admission() -> None:
    assert contract.decode_candidate(_raw(text="   "), 100).text == "   "


def test_accepted_conversation_round_trip_and_validation() -> None:
    turn = contract.AcceptedTurn(
        turn_id="c1:0:0",
        role="user",
        text="Ciao",
        nll=1.2,
        similarity=0.3,
        neighbour_id="seed:s1#0",
        embedder="e",
        scorer="s",
    )
    conv = contract.AcceptedConversation(
        schema_version=1, conversation_id="c1", source="selfchat", turns=[turn], target_length=4
    )
    back = contract.decode_accepted(contract.encode(conv))
    assert back.turns[0] == turn and back.conversation_id == "c1"
    with pytest.raises(ContractError, match="non-empty list"):
        contract.decode_accepted(b'{"schema_version": 1, "turns": []}')


def test_decision_reason_must_be_known() -> None:
    d = contract.Decision(
        schema_version=1,
        turn_id="t",
        conversation_id="c",
        index=0,
        accepted=False,
        reason="duplicate",
        neighbour_id="n",
        similarity=0.95,
        nll=1.0,
        tokens=4,
        embedder="e",
        scorer="s",
        similarity_threshold=0.9,
        nll_threshold=2.0,
    )
    assert contract.decode_decision(contract.encode(d)) == d
    bad = json.loads(contract.encode(d))
    bad["reason"] = "meh"
    with pytest.raises(ContractError, match="unknown reason"):
        contract.decode_decision(json.dumps(bad).encode())


def test_dead_letter_keeps_origin_and_bytes() -> None:
    dl = contract.dead_letter(
        topic="t",
        partition=3,
        offset=42,
        key=b"k",
        value=b"\xffabc",
        error=ValueError("boom"),
        stage="decode",
    )
    assert (dl.origin_topic, dl.origin_partition, dl.origin_offset) == ("t", 3, 42)
    assert dl.value == "\ufffdabc" and dl.error == "boom" and dl.error_type == "ValueError"
    assert (
        contract.dead_letter(
            topic="t", partition=0, offset=0, key=None, value=None, error="x", stage="decode"
        ).value
        is None
    )


# ---------------------------------------------------------------------------------
# The LLM judge's fields: optional, schema_version still 1, old events still decode.


def _decision(**kw) -> contract.Decision:
    base = dict(
        schema_version=1,
        turn_id="c1:1:0",
        conversation_id="c1",
        index=1,
        accepted=False,
        reason="judge_low",
        neighbour_id="seed:s1#0",
        similarity=0.3,
        nll=1.0,
        tokens=4,
        embedder="e",
        scorer="s",
        similarity_threshold=0.9,
        nll_threshold=2.0,
    )
    base.update(kw)
    return contract.Decision(**base)


def _scored(**kw) -> contract.ScoredTurn:
    base = dict(
        schema_version=1,
        candidate=cand(index=1, role="assistant", turn_id="c1:1:0", prompt="Ciao?"),
        precheck="",
        embedding=[0.6, 0.8],
        nll=1.0,
        tokens=4,
        embedder="e",
        scorer="s",
        nll_threshold=2.0,
    )
    base.update(kw)
    return contract.ScoredTurn(**base)


def test_reasons_are_one_enum_carried_as_strings() -> None:
    from streams.judge import judge_decision

    assert contract.SCHEMA_VERSION == 1
    values = [r.value for r in Reason]
    assert len(set(values)) == len(values) == 9
    assert Reason.ACCEPTED == "accepted"
    # An event carries the plain string, and reads back equal to the member.
    assert json.dumps({"reason": Reason.JUDGE_LOW}) == '{"reason": "judge_low"}'
    assert Reason(json.loads('"judge_unparsed"')) is Reason.JUDGE_UNPARSED
    # The judge's verdicts are members of the one enum.
    assert judge_decision(1.0, 3.0) == (False, Reason.JUDGE_LOW)
    assert judge_decision(None, 3.0) == (False, Reason.JUDGE_UNPARSED)
    assert judge_decision(None, 3.0, "accept") == (True, Reason.JUDGE_UNPARSED)
    assert judge_decision(4.0, 3.0) == (True, "")


def test_candidate_prompt_round_trip_and_default() -> None:
    c = cand(index=1, role="assistant", turn_id="c1:1:0", text="Bene, grazie!", prompt="Come stai?")
    assert contract.decode_candidate(contract.encode(c), 1000) == c
    # An event written before the field existed decodes with an empty prompt.
    assert contract.decode_candidate(_raw(prompt=...), 1000).prompt == ""
    with pytest.raises(ContractError, match="field 'prompt' must be str"):
        contract.decode_candidate(_raw(prompt=3), 100)
    with pytest.raises(ContractError, match=r"prompt.? has 101 characters, over the event limit"):
        contract.decode_candidate(_raw(prompt="x" * 101), 100)


def test_decision_judge_fields_round_trip_and_old_events() -> None:
    judged = _decision(judge_score=2.5, judge_threshold=3.0, judge="transformers:judge")
    assert contract.decode_decision(contract.encode(judged)) == judged
    unparsed = _decision(reason="judge_unparsed", judge_threshold=3.0, judge="j")
    assert contract.decode_decision(contract.encode(unparsed)).judge_score is None
    data = json.loads(contract.encode(_decision(reason="duplicate")))
    for k in ("judge_score", "judge_threshold", "judge"):
        del data[k]
    old = contract.decode_decision(json.dumps(data).encode())
    assert (old.judge_score, old.judge_threshold, old.judge) == (None, None, "")
    for bad, message in (
        (6.0, "judge_score must be within 0..5"),
        (-0.5, "judge_score must be within 0..5"),
        ("4", "field 'judge_score' must be float | None, got str"),
        (True, "got bool"),
    ):
        data = json.loads(contract.encode(judged))
        data["judge_score"] = bad
        with pytest.raises(ContractError, match=re.escape(message)):
            contract.decode_decision(json.dumps(data).encode())


def test_scored_turn_judge_fields_round_trip_and_old_events() -> None:
    s = _scored(
        judged=True,
        judge_score=4.0,
        judge_threshold=3.0,
        judge_on_unparsed="accept",
        judge="transformers:judge",
        judge_output="4\nBuona.",
    )
    back = contract.decode_scored(contract.encode(s))
    assert back == s and back.candidate.prompt == "Ciao?"
    data = json.loads(contract.encode(_scored()))
    for k in [k for k in data if k.startswith("judge")]:  # judged, judge_score, ...
        del data[k]
    del data["candidate"]["prompt"]
    old = contract.decode_scored(json.dumps(data).encode())
    assert (old.judged, old.judge_score, old.candidate.prompt) == (False, None, "")
    bad = json.loads(contract.encode(s))
    bad["judge_on_unparsed"] = "maybe"
    with pytest.raises(ContractError, match="judge_on_unparsed must be one of"):
        contract.decode_scored(json.dumps(bad).encode())
    bad = json.loads(contract.encode(s))
    bad["judge_score"] = 5.5
    with pytest.raises(ContractError, match=r"judge_score must be within 0\.\.5"):
        contract.decode_scored(json.dumps(bad).encode())


def test_accepted_turn_judge_score_round_trip_and_old_events() -> None:
    turns = [
        contract.AcceptedTurn(
            turn_id=f"c1:{i}:0",
            role=role,
            text="Ciao",
            nll=1.2,
            similarity=0.3,
            neighbour_id="seed:s1#0",
            embedder="e",
            scorer="s",
            judge_score=score,
        )
        for i, (role, score) in enumerate((("user", None), ("assistant", 4.5)))
    ]
    conv = contract.AcceptedConversation(
        schema_version=1, conversation_id="c1", source="selfchat", turns=turns, target_length=2
    )
    back = contract.decode_accepted(contract.encode(conv))
    assert [t.judge_score for t in back.turns] == [None, 4.5]
    data = json.loads(contract.encode(conv))
    for t in data["turns"]:
        del t["judge_score"]
    assert [t.judge_score for t in contract.decode_accepted(json.dumps(data).encode()).turns] == [
        None,
        None,
    ]
    data["turns"][1]["judge_score"] = 9
    with pytest.raises(ContractError, match=r"accepted turn: judge_score must be within 0\.\.5"):
        contract.decode_accepted(json.dumps(data).encode())


# ---- bounds (issue 10): nothing that breaks them may reach an engine


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"turn_id": "t" * 257}, r"'turn_id' has 257 bytes \(UTF-8\), over its limit 256"),
        ({"conversation_id": "è" * 129}, r"'conversation_id' has 258 bytes"),
        ({"source": "s" * 65}, r"'source' has 65 bytes"),
        ({"producer_id": "p" * 300}, r"'producer_id' has 300 bytes"),
        ({"turn_id": "ok\ud800"}, r"'turn_id' is not valid UTF-8 \(a lone surrogate"),
        ({"text": "Ciao \udfff!"}, r"'text' is not valid UTF-8"),
        ({"prompt": "\ud83d"}, r"'prompt' is not valid UTF-8"),
        ({"text": [[["annidato"]]]}, r"field 'text' must be str"),
    ],
)
def test_bounded_and_valid_strings(overrides: dict, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        contract.decode_candidate(_raw(**overrides), 100)


def test_an_id_at_its_limit_is_valid() -> None:
    c = contract.decode_candidate(_raw(turn_id="t" * 256), 100)
    assert len(c.turn_id) == 256


def test_lone_surrogates_sent_as_json_escapes_are_refused() -> None:
    # What a foreign producer writes: the escape is valid JSON, the string is not UTF-8.
    raw = _raw().replace(b'"turn_id": "c1:0:0"', b'"turn_id": "c1:\\ud800"')
    with pytest.raises(ContractError, match="lone surrogate"):
        contract.decode_candidate(raw, 100)


def test_deep_nesting_is_refused_before_parsing() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ContractError, match="nested deeper than 16"):
        contract.decode_candidate(deep, 100)
    inside = _raw().replace(b'"text": "Ciao, come stai?"', b'"text": ' + b"[" * 5000 + b"]" * 5000)
    with pytest.raises(ContractError, match="nested deeper"):
        contract.decode_candidate(inside, 100)
    # brackets inside strings are text, not nesting
    text = "[" * 200 + '"\\' + "{" * 200
    assert contract.decode_candidate(_raw(text=text), 1000).text == text


def test_the_raw_size_is_bounded_before_parsing() -> None:
    raw = _raw(text="x" * 90)
    with pytest.raises(ContractError, match=r"value has \d+ bytes, over the limit 100"):
        contract.decode_candidate(raw, 1000, max_bytes=100)
    assert contract.decode_candidate(raw, 1000, max_bytes=len(raw)).text == "x" * 90


def test_every_string_field_of_every_record_has_a_limit() -> None:
    records = [
        contract.CandidateTurn,
        contract.ScoredTurn,
        contract.Decision,
        contract.AcceptedTurn,
        contract.AcceptedConversation,
        contract.DeadLetter,
        contract.SnapshotPublished,
        contract.EvaluationPublished,
        contract.BuildPublished,
    ]
    missing = [
        f"{cls.__name__}.{name}"
        for cls in records
        for name, ann in cls._options.fields.items()
        if ann in (str, str | None) and name not in contract.FIELD_LIMITS.get(cls.__name__, {})
    ]
    assert missing == []


def test_oversized_ids_are_refused_in_decisions_and_scored_turns() -> None:
    scored = contract.ScoredTurn(
        schema_version=1,
        candidate=cand(turn_id="t" * 300),
        precheck="",
        embedding=[1.0, 0.0],
        nll=1.0,
        tokens=3,
        embedder="e",
        scorer="s",
        nll_threshold=2.0,
    )
    with pytest.raises(ContractError, match="'turn_id' has 300 bytes"):
        contract.decode_scored(contract.encode(scored))


def test_a_dead_letter_always_encodes() -> None:
    err = ContractError("bad id 'x\ud800' " + "e" * 5000)
    d = contract.dead_letter(
        topic="t",
        partition=0,
        offset=1,
        key=b"k\xff",
        value=b"v" * (contract.DEAD_VALUE_MAX_BYTES + 10),
        error=err,
        stage="decode",
    )
    data = json.loads(contract.encode(d))
    assert len(data["error"]) == contract.ERROR_MAX_CHARS and "\\ud800" in data["error"]
    assert data["value"].endswith(f"[{contract.DEAD_VALUE_MAX_BYTES + 10} bytes]")
    assert len(data["value"].encode()) <= contract.DEAD_VALUE_MAX_BYTES


def test_count_decisions_counts_each_turn_once_with_its_first_non_replayed() -> None:
    records = [
        {"turn_id": "a", "accepted": False, "reason": "low_quality", "replayed": True},
        {"turn_id": "a", "accepted": True, "reason": "accepted", "replayed": False},
        {"turn_id": "a", "accepted": False, "reason": "duplicate", "replayed": False},
        {"turn_id": "b", "accepted": True, "reason": "accepted", "replayed": True},
        {"turn_id": "b", "accepted": True, "reason": "accepted", "replayed": True},
        {"turn_id": "c", "accepted": False, "reason": "from_the_future"},
    ]
    counts = contract.count_decisions(records)
    assert (counts.decided, counts.accepted, counts.rejected) == (3, 2, 1)
    assert counts.acceptance_rate == pytest.approx(2 / 3)
    assert list(counts.by_reason)[: len(Reason)] == [r.value for r in Reason]
    assert counts.by_reason["accepted"] == 2
    assert counts.by_reason["low_quality"] == counts.by_reason["duplicate"] == 0
    assert counts.by_reason["from_the_future"] == 1
    assert [d["reason"] for d in contract.first_decisions(records)] == [
        "accepted",
        "accepted",
        "from_the_future",
    ]
    assert contract.count_decisions([]).acceptance_rate is None


def test_decision_log_rows_read_old_rows_and_refuse_incomplete_ones() -> None:
    row = contract.DecisionLogRow(
        accepted=True,
        reason="accepted",
        neighbour_id="s1",
        similarity=0.4,
        nll=2.5,
        tokens=12,
        nll_threshold=4.0,
        similarity_threshold=0.9,
        text_sha="abc",
    )
    assert contract.DecisionLogRow.from_dict(json.loads(json.dumps(row.as_dict()))) == row
    old = {k: v for k, v in row.as_dict().items() if not k.startswith("judge") and k != "text_sha"}
    back = contract.DecisionLogRow.from_dict({**old, "from_a_later_version": 1})
    assert (back.judge_score, back.judge_threshold, back.judge, back.text_sha) == (
        None,
        None,
        "",
        None,
    )
    assert back.nll == 2.5 and back.accepted
    with pytest.raises(ContractError, match="decision log row"):
        contract.DecisionLogRow.from_dict({"accepted": True})
