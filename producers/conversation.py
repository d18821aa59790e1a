"""The conversation state machine of a self-chat producer (pure: no Kafka, no I/O).

A conversation alternates roles, user at even positions and assistant at odd
ones, until it holds ``target_length`` accepted messages. At each position one
candidate is pending at a time::

    new_pending(text) -> CandidateTurn  (sent to turns.candidates)
    apply(decision)   -> ACCEPTED  the turn is appended; status "finished" at the target
                         RETRY     rejected; generate the position again
                         TRUNCATED rejected ``retry_cap`` + 1 times; status "truncated"
                         IGNORED   not the pending turn (a replay, a duplicate delivery)

An assistant candidate carries the user turn it answers as its ``prompt`` (what
the optional LLM judge reads); an accepted turn keeps the judge's score, if any,
and publishes it with the conversation.

Turn ids are ``f"{conversation_id}:{index}:{attempt}"``: deterministic, so a
candidate re-sent after a crash is the same turn and downstream admission,
idempotent on ``turn_id``, decides it once.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from corpusfactory.chatformat import Message
from corpusfactory.contract import (
    SCHEMA_VERSION,
    AcceptedConversation,
    AcceptedTurn,
    CandidateTurn,
    Decision,
)

Status = Literal["active", "finished", "truncated"]
STATE_VERSION = 1


class Outcome(StrEnum):
    """What ``Conversation.apply`` did with a decision."""

    IGNORED = "ignored"
    ACCEPTED = "accepted"
    RETRY = "retry"
    TRUNCATED = "truncated"


@dataclass
class PendingTurn:
    """The candidate sent for admission and not decided yet."""

    turn_id: str
    index: int
    role: str
    text: str
    attempt: int
    generator: str = ""
    producer_id: str = ""
    created_at: float = 0.0


def draw_target_length(rng: random.Random, min_messages: int, max_messages: int) -> int:
    """A target length drawn uniformly from ``[min_messages, max_messages]`` inclusive."""
    if min_messages < 1 or min_messages > max_messages:
        raise ValueError(f"bad length bounds [{min_messages}, {max_messages}]")
    return rng.randint(min_messages, max_messages)


def turn_id_for(conversation_id: str, index: int, attempt: int) -> str:
    return f"{conversation_id}:{index}:{attempt}"


@dataclass
class Conversation:
    conversation_id: str
    source: str
    target_length: int
    seed_ids: list[str] = field(default_factory=list)
    messages: list[AcceptedTurn] = field(default_factory=list)
    pending: PendingTurn | None = None
    attempts_at_position: int = 0  # rejections at the current position so far
    status: Status = "active"
    created_at: float = 0.0
    retry_cap: int = 3  # regenerations of a rejected turn before truncation
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        if self.target_length < 1:
            raise ValueError("target_length must be >= 1")
        if self.retry_cap < 0:
            raise ValueError("retry_cap must be >= 0")

    # -- queries ------------------------------------------------------------------

    @property
    def index(self) -> int:
        """Position of the next message (the number of accepted ones)."""
        return len(self.messages)

    @property
    def done(self) -> bool:
        return self.status != "active"

    def next_role(self) -> str:
        """``user`` at even positions, ``assistant`` at odd ones."""
        return "user" if self.index % 2 == 0 else "assistant"

    def history(self) -> list[Message]:
        """The accepted messages, for building the next prompt."""
        return [Message(role=m.role, text=m.text) for m in self.messages]

    # -- transitions --------------------------------------------------------------

    def new_pending(
        self, text: str, generator_id: str, now: float, producer_id: str = ""
    ) -> CandidateTurn:
        """Record ``text`` as the pending candidate for the next position and return it."""
        if self.done:
            raise ValueError(f"conversation {self.conversation_id} is {self.status}")
        if self.pending is not None:
            raise ValueError(
                f"conversation {self.conversation_id} already has pending turn "
                f"{self.pending.turn_id}"
            )
        index = self.index
        attempt = self.attempts_at_position
        self.pending = PendingTurn(
            turn_id=turn_id_for(self.conversation_id, index, attempt),
            index=index,
            role=self.next_role(),
            text=text,
            attempt=attempt,
            generator=generator_id,
            producer_id=producer_id,
            created_at=now,
        )
        return self.pending_candidate()

    def pending_candidate(self) -> CandidateTurn:
        """The pending turn as a CandidateTurn, identical on every call (for re-sending)."""
        p = self.pending
        if p is None:
            raise ValueError(f"conversation {self.conversation_id} has no pending turn")
        return CandidateTurn(
            schema_version=SCHEMA_VERSION,
            turn_id=p.turn_id,
            conversation_id=self.conversation_id,
            index=p.index,
            role=p.role,
            text=p.text,
            source=self.source,
            producer_id=p.producer_id,
            generator=p.generator,
            attempt=p.attempt,
            created_at=p.created_at,
            prompt=self.prompt_for(p.index, p.role),
        )

    def prompt_for(self, index: int, role: str) -> str:
        """The user turn an assistant turn at ``index`` answers ("" for a user turn)."""
        if role != "assistant" or index == 0 or index > len(self.messages):
            return ""
        prev = self.messages[index - 1]
        return prev.text if prev.role == "user" else ""

    def apply(self, decision: Decision, now: float | None = None) -> Outcome:
        """Apply the decision for the pending turn; anything else is IGNORED."""
        p = self.pending
        if (
            self.done
            or p is None
            or decision.conversation_id != self.conversation_id
            or decision.turn_id != p.turn_id
        ):
            return Outcome.IGNORED
        self.pending = None
        when = time.time() if now is None else now
        if decision.accepted:
            self.messages.append(
                AcceptedTurn(
                    turn_id=p.turn_id,
                    role=p.role,
                    text=p.text,
                    nll=float(decision.nll),
                    similarity=float(decision.similarity),
                    neighbour_id=decision.neighbour_id,
                    embedder=decision.embedder,
                    scorer=decision.scorer,
                    judge_score=decision.judge_score,
                )
            )
            self.attempts_at_position = 0
            if len(self.messages) >= self.target_length:
                self.status = "finished"
                self.finished_at = when
            return Outcome.ACCEPTED
        self.attempts_at_position += 1
        if self.attempts_at_position > self.retry_cap:
            self.status = "truncated"
            self.finished_at = when
            return Outcome.TRUNCATED
        return Outcome.RETRY

    def reject_unsent(self, now: float | None = None) -> Outcome:
        """Count a generation that produced no text as a rejection at this position.

        Nothing was sent (an empty text breaks the event contract), so no decision
        will come; the position is generated again, up to the retry cap.
        """
        if self.done:
            raise ValueError(f"conversation {self.conversation_id} is {self.status}")
        if self.pending is not None:
            raise ValueError(f"conversation {self.conversation_id} has a pending turn")
        self.attempts_at_position += 1
        if self.attempts_at_position > self.retry_cap:
            self.status = "truncated"
            self.finished_at = time.time() if now is None else now
            return Outcome.TRUNCATED
        return Outcome.RETRY

    # -- output -------------------------------------------------------------------

    def to_accepted(self, producer_id: str, generator: str) -> AcceptedConversation:
        """The conversation as published to ``corpus.accepted`` (its accepted messages)."""
        return AcceptedConversation(
            schema_version=SCHEMA_VERSION,
            conversation_id=self.conversation_id,
            source=self.source,
            turns=list(self.messages),
            target_length=self.target_length,
            truncated=self.status == "truncated",
            producer_id=producer_id,
            generator=generator,
            finished_at=self.finished_at or time.time(),
        )

    # -- persistence --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # the messages are faust Records, copied as they are
        data["messages"] = [m.asdict() for m in self.messages]
        data["state_version"] = STATE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        data = dict(data)
        version = data.pop("state_version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"unknown conversation state_version {version!r}")
        data["messages"] = [AcceptedTurn(**m) for m in data.get("messages", [])]
        pending = data.get("pending")
        data["pending"] = PendingTurn(**pending) if pending is not None else None
        data["seed_ids"] = list(data.get("seed_ids", []))
        if data.get("status") not in ("active", "finished", "truncated"):
            raise ValueError(f"unknown conversation status {data.get('status')!r}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        return cls.from_dict(json.loads(text))
