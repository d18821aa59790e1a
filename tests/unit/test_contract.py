"""The event contract: round trips and strict decoding."""

from __future__ import annotations

import json

import pytest

from corpusfactory import contract
from corpusfactory.contract import ContractError


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
