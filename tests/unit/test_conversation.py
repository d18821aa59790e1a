"""The producer's conversation state machine and its durable SQLite store."""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.contract import (
    SCHEMA_VERSION,
    AcceptedConversation,
    CandidateTurn,
    Decision,
    decode_accepted,
    encode,
)
from corpusfactory.settings import ProducerSettings
from producers.channel import should_publish, stale
from producers.conversation import (
    Conversation,
    Outcome,
    PendingTurn,
    draw_target_length,
)
from producers.state import ConversationStore


def decision_for(cand: CandidateTurn, accepted: bool, **over: Any) -> Decision:
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "turn_id": cand.turn_id,
        "conversation_id": cand.conversation_id,
        "index": cand.index,
        "accepted": accepted,
        "reason": "accepted" if accepted else "duplicate",
        "neighbour_id": "seed-3" if accepted else "c0:0:0",
        "similarity": 0.42 if accepted else 0.97,
        "nll": 1.5,
        "tokens": 7,
        "embedder": "emb",
        "scorer": "scr",
        "similarity_threshold": 0.9,
        "nll_threshold": 2.0,
        "decided_at": 100.0,
    }
    fields.update(over)
    return Decision(**fields)


def new_conv(cid: str = "c1", target: int = 4, retry_cap: int = 3) -> Conversation:
    return Conversation(
        conversation_id=cid,
        source="selfchat",
        target_length=target,
        seed_ids=["seed-1", "seed-7"],
        created_at=10.0,
        retry_cap=retry_cap,
    )


# ---------------------------------------------------------------------------------
# target lengths


def test_target_length_is_uniform_and_inclusive() -> None:
    rng = random.Random(2024)
    draws = [draw_target_length(rng, 4, 10) for _ in range(7000)]
    counts = Counter(draws)
    assert set(counts) == set(range(4, 11))
    # Roughly uniform: each of 7 values near 1000.
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_target_length_bounds() -> None:
    rng = random.Random(0)
    assert {draw_target_length(rng, 5, 5) for _ in range(20)} == {5}
    with pytest.raises(ValueError):
        draw_target_length(rng, 6, 5)


def test_draws_are_reproducible_from_the_rng_seed() -> None:
    a = [draw_target_length(random.Random(9), 4, 10) for _ in range(5)]
    b = [draw_target_length(random.Random(9), 4, 10) for _ in range(5)]
    assert a == b


# ---------------------------------------------------------------------------------
# transitions


def test_roles_alternate_user_first() -> None:
    conv = new_conv(target=6)
    roles = []
    for i in range(6):
        roles.append(conv.next_role())
        cand = conv.new_pending(f"messaggio {i}", "gen", now=1.0)
        assert cand.role == roles[-1]
        assert cand.index == i
        assert conv.apply(decision_for(cand, True)) is Outcome.ACCEPTED
    assert roles == ["user", "assistant"] * 3
    assert [m.role for m in conv.messages] == roles


def test_new_pending_builds_a_deterministic_candidate() -> None:
    conv = new_conv()
    cand = conv.new_pending("Ciao!", "transformers:tiny", now=12.5, producer_id="p-0")
    assert cand.turn_id == "c1:0:0"
    assert cand.conversation_id == "c1"
    assert cand.schema_version == SCHEMA_VERSION
    assert (cand.index, cand.role, cand.text, cand.attempt) == (0, "user", "Ciao!", 0)
    assert (cand.source, cand.generator, cand.producer_id, cand.created_at) == (
        "selfchat",
        "transformers:tiny",
        "p-0",
        12.5,
    )
    # A re-send (e.g. after a crash) is byte-identical.
    assert encode(conv.pending_candidate()) == encode(cand)
    with pytest.raises(ValueError, match="already has pending"):
        conv.new_pending("altro", "gen", now=13.0)


def test_accept_path_to_finished() -> None:
    conv = new_conv(target=4)
    for i in range(4):
        assert conv.status == "active"
        cand = conv.new_pending(f"t{i}", "gen", now=float(i))
        assert conv.apply(decision_for(cand, True), now=50.0 + i) is Outcome.ACCEPTED
        assert conv.pending is None
    assert conv.status == "finished"
    assert conv.done
    assert conv.finished_at == 53.0
    assert [m.turn_id for m in conv.messages] == ["c1:0:0", "c1:1:0", "c1:2:0", "c1:3:0"]
    first = conv.messages[0]
    assert (first.nll, first.similarity, first.neighbour_id) == (1.5, 0.42, "seed-3")
    assert (first.embedder, first.scorer) == ("emb", "scr")
    with pytest.raises(ValueError, match="finished"):
        conv.new_pending("oltre", "gen", now=0.0)

    acc = conv.to_accepted("p-0", "transformers:tiny")
    assert isinstance(acc, AcceptedConversation)
    assert acc.truncated is False
    assert acc.target_length == 4
    assert acc.finished_at == 53.0
    assert [t.text for t in acc.turns] == ["t0", "t1", "t2", "t3"]
    assert [t.role for t in acc.turns] == ["user", "assistant", "user", "assistant"]
    # It passes the strict contract decoder.
    back = decode_accepted(encode(acc))
    assert back.conversation_id == "c1"
    assert back.turns[1].turn_id == "c1:1:0"


def test_retry_path_to_truncation_at_the_cap() -> None:
    conv = new_conv(target=6, retry_cap=2)
    cand = conv.new_pending("primo", "gen", now=0.0)
    assert conv.apply(decision_for(cand, True)) is Outcome.ACCEPTED
    outcomes = []
    turn_ids = []
    for attempt in range(3):
        cand = conv.new_pending(f"risposta {attempt}", "gen", now=0.0)
        turn_ids.append(cand.turn_id)
        assert cand.attempt == attempt
        assert cand.role == "assistant"
        outcomes.append(conv.apply(decision_for(cand, False)))
    # retry_cap=2 regenerations: attempts 0, 1, 2, then truncation.
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.TRUNCATED]
    assert turn_ids == ["c1:1:0", "c1:1:1", "c1:1:2"]
    assert conv.status == "truncated"
    assert len(conv.messages) == 1
    acc = conv.to_accepted("p-0", "gen")
    assert acc.truncated is True
    assert [t.text for t in acc.turns] == ["primo"]


def test_acceptance_after_retries_resets_the_attempt_counter() -> None:
    conv = new_conv(target=3, retry_cap=3)
    cand = conv.new_pending("a", "gen", now=0.0)
    assert conv.apply(decision_for(cand, False)) is Outcome.RETRY
    cand = conv.new_pending("b", "gen", now=0.0)
    assert cand.turn_id == "c1:0:1"
    assert conv.apply(decision_for(cand, True)) is Outcome.ACCEPTED
    assert conv.attempts_at_position == 0
    cand = conv.new_pending("c", "gen", now=0.0)
    assert cand.turn_id == "c1:1:0"


def test_stale_and_duplicate_decisions_are_ignored() -> None:
    conv = new_conv(target=4)
    # Decisions for another turn or another conversation.
    cand0 = conv.new_pending("x", "gen", now=0.0)
    stray = decision_for(cand0, True, turn_id="c1:5:0")
    assert conv.apply(stray) is Outcome.IGNORED
    other_conv = decision_for(cand0, True, conversation_id="c2")
    assert conv.apply(other_conv) is Outcome.IGNORED
    assert conv.pending is not None

    rejected = decision_for(cand0, False)
    assert conv.apply(rejected) is Outcome.RETRY
    # Duplicate delivery of the same decision: nothing is pending any more.
    assert conv.apply(rejected) is Outcome.IGNORED
    cand1 = conv.new_pending("y", "gen", now=0.0)
    # A late replay of the decision for the earlier attempt.
    assert conv.apply(rejected) is Outcome.IGNORED
    assert conv.attempts_at_position == 1
    accepted = decision_for(cand1, True, replayed=True)
    assert conv.apply(accepted) is Outcome.ACCEPTED
    assert conv.apply(accepted) is Outcome.IGNORED
    assert [m.text for m in conv.messages] == ["y"]


def test_decisions_after_the_end_are_ignored() -> None:
    conv = new_conv(target=1)
    cand = conv.new_pending("solo", "gen", now=0.0)
    assert conv.apply(decision_for(cand, True)) is Outcome.ACCEPTED
    assert conv.status == "finished"
    assert conv.apply(decision_for(cand, True)) is Outcome.IGNORED
    assert conv.apply(decision_for(cand, False)) is Outcome.IGNORED
    assert conv.status == "finished"


def test_history_feeds_the_prompt() -> None:
    conv = new_conv(target=4)
    for text in ("Ciao", "Ciao! Come posso aiutarti?"):
        cand = conv.new_pending(text, "gen", now=0.0)
        conv.apply(decision_for(cand, True))
    hist = conv.history()
    assert [(m.role, m.text) for m in hist] == [
        ("user", "Ciao"),
        ("assistant", "Ciao! Come posso aiutarti?"),
    ]


# ---------------------------------------------------------------------------------
# JSON round trip


def test_json_round_trip_with_pending_and_messages() -> None:
    conv = new_conv(target=5)
    cand = conv.new_pending("Qual è la capitale d'Italia?", "gen", now=1.0, producer_id="p")
    conv.apply(decision_for(cand, True))
    cand = conv.new_pending("Roma — naturalmente.", "gen", now=2.0, producer_id="p")
    conv.apply(decision_for(cand, False))
    conv.new_pending("È Roma.", "gen", now=3.0, producer_id="p")

    text = conv.to_json()
    assert json.loads(text)["state_version"] == 1
    back = Conversation.from_json(text)
    assert back == conv
    assert isinstance(back.pending, PendingTurn)
    assert back.to_json() == text
    assert encode(back.pending_candidate()) == encode(conv.pending_candidate())
    # The restored state machine carries on where it was.
    assert back.apply(decision_for(back.pending_candidate(), True)) is Outcome.ACCEPTED
    assert [m.turn_id for m in back.messages] == ["c1:0:0", "c1:1:1"]


def test_json_rejects_unknown_versions_and_statuses() -> None:
    data = json.loads(new_conv().to_json())
    with pytest.raises(ValueError, match="state_version"):
        Conversation.from_dict({**data, "state_version": 2})
    with pytest.raises(ValueError, match="status"):
        Conversation.from_dict({**data, "status": "paused"})


# ---------------------------------------------------------------------------------
# durable store


def _finished(cid: str) -> Conversation:
    conv = new_conv(cid, target=1)
    cand = conv.new_pending("fatto", "gen", now=0.0)
    conv.apply(decision_for(cand, True))
    return conv


def _truncated(cid: str) -> Conversation:
    conv = new_conv(cid, target=3, retry_cap=0)
    cand = conv.new_pending("no", "gen", now=0.0)
    conv.apply(decision_for(cand, False))
    return conv


def test_store_survives_reopen_and_returns_exactly_the_active_ones(tmp_path: Path) -> None:
    path = tmp_path / "state" / "producer.db"
    store = ConversationStore(path)
    active_a = new_conv("a", target=4)
    active_b = new_conv("b", target=6)
    pending = active_b.new_pending("in volo", "gen", now=5.0, producer_id="p")
    store.save(active_a)
    store.save(active_b)
    store.save(_finished("f"))
    store.save(_truncated("t"))
    # A conversation saved while active and then finished is no longer active.
    moving = new_conv("m", target=1)
    store.save(moving)
    cand = moving.new_pending("ciao", "gen", now=0.0)
    store.save(moving)
    moving.apply(decision_for(cand, True))
    store.save(moving)
    store.mark_published("f")
    store.close()

    with ConversationStore(path) as reopened:
        active = reopened.load_active()
        assert sorted(c.conversation_id for c in active) == ["a", "b"]
        by_id = {c.conversation_id: c for c in active}
        assert by_id["a"] == active_a
        assert by_id["b"] == active_b
        # The pending turn is re-sent with the same turn id after a restart.
        assert encode(by_id["b"].pending_candidate()) == encode(pending)
        assert sorted(c.conversation_id for c in reopened.load_unpublished()) == ["m", "t"]
        assert reopened.counts() == {"active": 2, "finished": 2, "truncated": 1, "published": 1}
        got = reopened.get("t")
        assert got is not None and got.status == "truncated"
        assert reopened.get("zzz") is None
        with pytest.raises(KeyError):
            reopened.mark_published("zzz")


def test_store_uses_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    store = ConversationStore(path)
    try:
        store.save(new_conv("a"))
        assert store._conn is not None
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()
    # Another connection sees the committed row.
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT conversation_id, status FROM conversations").fetchall()
    conn.close()
    assert rows == [("a", "active")]


def test_store_save_overwrites_the_previous_state(tmp_path: Path) -> None:
    with ConversationStore(tmp_path / "p.db") as store:
        conv = new_conv("a", target=4)
        store.save(conv)
        cand = conv.new_pending("uno", "gen", now=0.0)
        conv.apply(decision_for(cand, True))
        store.save(conv)
        (loaded,) = store.load_active()
        assert [m.text for m in loaded.messages] == ["uno"]
        assert store.counts()["active"] == 1


def test_store_rolls_back_a_failed_change(tmp_path: Path) -> None:
    with ConversationStore(tmp_path / "p.db") as store:
        store.save(new_conv("a"))
        with pytest.raises(KeyError):
            store.mark_published("missing")
        # The store still works and nothing was published.
        assert store.counts()["published"] == 0
        store.mark_published("a")
        assert store.counts()["published"] == 1


def test_reject_unsent_counts_towards_the_retry_cap() -> None:
    conv = Conversation(conversation_id="c-empty", source="t", target_length=4, retry_cap=1)
    assert conv.reject_unsent(now=1.0) is Outcome.RETRY
    assert conv.status == "active" and conv.index == 0
    assert conv.reject_unsent(now=2.0) is Outcome.TRUNCATED
    assert conv.status == "truncated" and conv.finished_at == 2.0
    with pytest.raises(ValueError):
        conv.reject_unsent()


# ---------------------------------------------------------------------------------
# the LLM judge: prompts on candidates, scores kept with the accepted turns


def test_an_assistant_candidate_carries_the_user_turn_it_answers() -> None:
    conv = new_conv(target=4)
    user = conv.new_pending("Qual è la capitale d'Italia?", "gen", now=0.0)
    assert user.prompt == ""  # a user turn answers nothing
    conv.apply(decision_for(user, True))
    first = conv.new_pending("Parigi.", "gen", now=1.0)
    assert (first.role, first.prompt) == ("assistant", "Qual è la capitale d'Italia?")
    conv.apply(decision_for(first, False, reason="judge_low", judge_score=0.5))
    retry = conv.new_pending("Roma.", "gen", now=2.0)
    assert (retry.attempt, retry.prompt) == (1, "Qual è la capitale d'Italia?")
    assert encode(conv.pending_candidate()) == encode(retry)  # re-sent identically
    conv.apply(decision_for(retry, True, judge_score=4.5, judge_threshold=3.0, judge="j"))
    assert conv.new_pending("Grazie!", "gen", now=3.0).prompt == ""


def test_the_judge_score_is_stored_with_the_accepted_turn() -> None:
    conv = new_conv(target=2)
    user = conv.new_pending("Come stai?", "gen", now=0.0)
    conv.apply(decision_for(user, True))
    reply = conv.new_pending("Bene, grazie!", "gen", now=1.0)
    conv.apply(decision_for(reply, True, judge_score=4.0, judge_threshold=3.0, judge="j"))
    assert [m.judge_score for m in conv.messages] == [None, 4.0]
    acc = decode_accepted(encode(conv.to_accepted("p-0", "gen")))
    assert [t.judge_score for t in acc.turns] == [None, 4.0]
    # The state survives a restart, and state saved before the judge existed loads.
    assert Conversation.from_json(conv.to_json()) == conv
    old = json.loads(conv.to_json())
    for m in old["messages"]:
        del m["judge_score"]
    assert [m.judge_score for m in Conversation.from_dict(old).messages] == [None, None]


# ---------------------------------------------------------------------------------
# the channel's rules, shared by the self-chat producer and ingest


def test_what_a_closed_conversation_publishes() -> None:
    p = ProducerSettings(publish_truncated=True, min_truncated_messages=2)
    conv = new_conv(target=2, retry_cap=0)
    assert not should_publish(conv, p)  # nothing accepted yet
    cand = conv.new_pending("Ciao", "gen", 11.0, "p")
    conv.apply(decision_for(cand, True))
    cand = conv.new_pending("Salve", "gen", 12.0, "p")
    conv.apply(decision_for(cand, True))
    assert conv.status == "finished" and should_publish(conv, p)
    short = new_conv(target=4, retry_cap=0)
    cand = short.new_pending("Ciao", "gen", 11.0, "p")
    short.apply(decision_for(cand, True))
    cand = short.new_pending("Ciao", "gen", 12.0, "p")
    short.apply(decision_for(cand, False))  # retry cap 0: truncated after one message
    assert short.status == "truncated" and len(short.messages) == 1
    assert not should_publish(short, p)
    assert should_publish(short, p.model_copy(update={"min_truncated_messages": 1}))
    assert not should_publish(short, p.model_copy(update={"publish_truncated": False}))


def test_stale_lists_only_pending_turns_that_waited_too_long() -> None:
    waiting, fresh, idle = new_conv("a"), new_conv("b"), new_conv("c")
    waiting.new_pending("Ciao", "gen", 100.0, "p")
    fresh.new_pending("Ciao", "gen", 150.0, "p")
    assert stale([waiting, fresh, idle], timeout_s=30.0, now=160.0) == [waiting]
    assert stale([waiting, fresh, idle], timeout_s=5.0, now=160.0) == [waiting, fresh]
