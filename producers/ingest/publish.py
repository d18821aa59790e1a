"""Publishing refined conversations through the factory's own admission.

``IngestPublisher`` sends every turn of a refined conversation as a
``CandidateTurn`` on ``turns.candidates`` (keyed by conversation id, ``source``
the format name), exactly as a self-chat producer would, so ingested text meets
the same scorer and admitter (similarity, NLL, pre-checks) as generated text::

    namespace, run_id = run_identity(path, "fauno", language="it", min_chars=20,
                                     drop_non_target=True)
    conversations, report = refine_file(path, "fauno")
    stats = asyncio.run(IngestPublisher(settings, bootstrap, "fauno", namespace,
                                        run_id).run(conversations))

or ``corpusfactory ingest FILE --format fauno`` with the workers running.

Ordering. Within a conversation one turn is in flight at a time: the next turn
leaves only after the previous one was accepted, because a rejected turn ends
the conversation (the answers after it refer to it). Many conversations are in
flight at once (``in_flight``). A conversation ends complete (every turn
accepted: published with ``truncated: false``) or at its first rejection (the
accepted prefix is published with ``truncated: true`` when it holds at least
``producer.min_truncated_messages`` messages and ``producer.publish_truncated``
is set, the self-chat producer's rule). Only accepted, published-in-order
turns reach ``corpus.accepted``; every accepted vector is a decided turn (I4).

Identity. ``namespace`` is ``FORMAT-<sha256 of the file, 12 hex>``; a
conversation's id is ``NAMESPACE:<id in the file>`` and its turn ids are
``CONVERSATION:INDEX:0`` (the producer's scheme, attempt always 0: ingest never
regenerates). The same file content always gives the same ids, whatever its
path or refinement options.

Resumability. The conversation state machine and SQLite store are the
producer's (``producers.conversation``, ``producers.state``), in
``<state>/ingest/<run_id>.sqlite``; ``run_id`` adds a hash of the refinement
options to the namespace. A pending turn is saved before it is sent, and a
closed conversation is marked published after its record is acknowledged. So:

* re-running the same file with the same options after it finished sends
  nothing and publishes nothing (every conversation is already closed);
* after a crash it publishes the closed-but-unpublished ones, re-sends each
  pending turn under its turn id (the admitter answers a decided turn with its
  first decision, ``replayed``) and carries on;
* without the state file (lost, or other options), every turn is sent again
  under the same turn ids: the admitter replays every decision, so no turn is
  accepted twice and no vector is added; the same conversations are published
  again under the same ids, which the corpus writer (idempotent by
  conversation id) and the trainer (by id) skip (I2). With other options a
  conversation can come out longer than the first time; the corpus keeps the
  first publication, so re-ingest with other options only after a fresh start.

Limits. Identical texts are duplicates to the admitter, so OASST paths of one
tree, which share their first messages, yield the first path only: a later
path's first turn is rejected as ``duplicate`` and ends it. A message longer than
``admission.max_event_chars`` would be dead-lettered, never decided: it ends its
conversation unsent (counted in ``oversized``).

Decisions are read without a consumer group: the publisher assigns itself every
decision partition at its end before the first send (as the producer does), so
no decision of its candidates can be missed, and a pending turn is re-sent
after ``producer.decision_timeout_s`` without a decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpusfactory import contract
from corpusfactory.chatformat import Message
from corpusfactory.errors import UsageError
from corpusfactory.settings import Settings
from producers.channel import TurnChannel, stale
from producers.conversation import Conversation, Outcome
from producers.ingest.formats import IngestError
from producers.ingest.refine import RefinedConversation
from producers.state import ConversationStore

log = logging.getLogger(__name__)


def run_identity(
    path: str | Path, fmt: str, *, language: str, min_chars: int, drop_non_target: bool
) -> tuple[str, str]:
    """(namespace of the conversation ids, run id naming the state file and producer_id)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise IngestError(f"{path}: cannot read the file: {e.strerror or e}") from e
    namespace = f"{fmt}-{digest.hexdigest()[:12]}"
    options = json.dumps([language.strip().lower(), min_chars, drop_non_target])
    return namespace, f"ingest-{namespace}-{hashlib.sha256(options.encode()).hexdigest()[:6]}"


@dataclass
class IngestStats:
    """What one publishing run did (``as_dict``: the CLI's ``publish`` object)."""

    conversations_sent: int = 0  # conversations with a turn sent by this run
    resumed: int = 0  # of those, left in progress by an earlier run
    already_done: int = 0  # closed by an earlier run: nothing sent
    turns_sent: int = 0  # acknowledged by Kafka
    turns_resent: int = 0  # pending turns sent again (resume, or no decision in time)
    accepted: int = 0
    rejected: int = 0
    decisions: Counter[str] = field(default_factory=Counter)  # by reason
    replayed: int = 0  # decisions repeating an earlier one (the turn was decided before)
    oversized: int = 0  # over admission.max_event_chars: cut here, never sent
    complete: int = 0  # every turn accepted
    truncated: int = 0  # ended at a rejected (or oversized) turn
    published: int = 0
    published_truncated: int = 0
    not_published: int = 0  # truncated below producer.min_truncated_messages
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "decisions": dict(self.decisions)}


@dataclass
class _Slot:
    conv: Conversation
    messages: tuple[Message, ...]


class IngestPublisher:
    """Send refined conversations for admission turn by turn; publish accepted prefixes."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        source: str,
        namespace: str,
        run_id: str,
        *,
        in_flight: int = 32,
    ) -> None:
        if in_flight < 1:
            raise UsageError(f"in_flight must be at least 1, got {in_flight}")
        self.settings = settings
        self.p = settings.producer
        self.bootstrap = bootstrap
        self.source = source
        self.namespace = namespace
        self.run_id = run_id
        self.in_flight = in_flight
        self.stats = IngestStats()
        self.store = ConversationStore(settings.state_path / "ingest" / f"{run_id}.sqlite")
        self.active: dict[str, _Slot] = {}
        self._outbox: list[tuple[contract.CandidateTurn, bool]] = []  # (candidate, re-send)

    def conversation_id(self, refined: RefinedConversation) -> str:
        return f"{self.namespace}:{refined.id}"

    async def run(
        self, conversations: Iterable[RefinedConversation], stop: asyncio.Event | None = None
    ) -> IngestStats:
        t0 = time.perf_counter()
        stop = stop or asyncio.Event()
        # No consumer group: positioned at the end before any candidate leaves, every
        # decision for one of ours comes later; older ones (other runs) are skipped.
        # Undecodable decisions are skipped: the self-chat producers dead-letter them.
        channel = TurnChannel(
            self.settings, self.bootstrap, group=None, dead_letter=False, stage="ingest"
        )
        try:
            await channel.start()
            for conv in self.store.load_unpublished():  # closed just before a crash
                await self._publish(channel, conv)
            source: Iterator[RefinedConversation] | None = iter(conversations)
            while not stop.is_set():
                if source is not None and not await self._fill(channel, source):
                    source = None
                await self._flush(channel)
                if not self.active:
                    break
                for decision in await channel.decisions(wait_ms=1000):
                    await self._on_decision(channel, decision)
                self._resend_stale()
        finally:
            await channel.stop()
            self.store.close()
            self.stats.wall_s = time.perf_counter() - t0
        return self.stats

    async def _fill(self, channel: TurnChannel, source: Iterator[RefinedConversation]) -> bool:
        """Start conversations up to ``in_flight``; False once ``source`` is exhausted."""
        while len(self.active) < self.in_flight:
            refined = next(source, None)
            if refined is None:
                return False
            cid = self.conversation_id(refined)
            conv = self.store.get(cid)
            if conv is not None and conv.done:
                self.stats.already_done += 1
                continue
            slot = _Slot(conv or self._new(cid, refined), refined.messages)
            self.active[cid] = slot
            self.stats.conversations_sent += 1
            if conv is not None:
                self.stats.resumed += 1
            if conv is not None and conv.pending is not None:
                self._resend(conv)  # decided or not: the admitter answers either way
            else:
                await self._advance(channel, slot)
        return True

    def _new(self, cid: str, refined: RefinedConversation) -> Conversation:
        # retry_cap 0: the first rejection truncates (there is nothing to regenerate).
        return Conversation(
            conversation_id=cid,
            source=self.source,
            target_length=len(refined.messages),
            retry_cap=0,
            created_at=time.time(),
        )

    async def _advance(self, channel: TurnChannel, slot: _Slot) -> None:
        """Queue the conversation's next turn, saved as pending before it can leave."""
        conv = slot.conv
        message = slot.messages[conv.index]
        if message.role != conv.next_role():
            raise IngestError(
                f"{conv.conversation_id}: message {conv.index} is {message.role!r}, "
                f"expected {conv.next_role()!r}"
            )
        if len(message.text) > self.settings.admission.max_event_chars:
            # The scorer would dead-letter it and never decide: a rejection here.
            self.stats.oversized += 1
            conv.reject_unsent()
            await self._close(channel, conv)
            return
        cand = conv.new_pending(message.text, "", time.time(), self.run_id)
        self.store.save(conv)
        self._outbox.append((cand, False))

    def _resend(self, conv: Conversation) -> None:
        assert conv.pending is not None
        conv.pending.created_at = time.time()
        self.store.save(conv)
        self._outbox.append((conv.pending_candidate(), True))

    async def _flush(self, channel: TurnChannel) -> None:
        outbox, self._outbox = self._outbox, []
        # every candidate acknowledged before waiting on decisions
        await channel.send([c for c, _ in outbox])
        resent = sum(resend for _, resend in outbox)
        self.stats.turns_resent += resent
        self.stats.turns_sent += len(outbox) - resent

    async def _on_decision(self, channel: TurnChannel, decision: contract.Decision) -> None:
        slot = self.active.get(decision.conversation_id)
        if slot is None or slot.conv.apply(decision) is Outcome.IGNORED:
            return  # another producer's turn, or a duplicate delivery of an applied one
        st = self.stats
        st.decisions[decision.reason] += 1
        st.replayed += decision.replayed
        if decision.accepted:
            st.accepted += 1
        else:
            st.rejected += 1
        if slot.conv.done:
            await self._close(channel, slot.conv)
        else:
            await self._advance(channel, slot)

    async def _close(self, channel: TurnChannel, conv: Conversation) -> None:
        self.store.save(conv)
        self.active.pop(conv.conversation_id, None)
        if conv.status == "finished":
            self.stats.complete += 1
        else:
            self.stats.truncated += 1
        await self._publish(channel, conv)

    async def _publish(self, channel: TurnChannel, conv: Conversation) -> None:
        if await channel.publish(conv, self.p, self.run_id, ""):
            self.stats.published += 1
            self.stats.published_truncated += conv.status != "finished"
        else:
            self.stats.not_published += 1
        self.store.mark_published(conv.conversation_id)  # "closed and handled"

    def _resend_stale(self) -> None:
        """Send again a pending turn that waited too long (a lost worker); same turn id."""
        now = time.time()
        for conv in stale((s.conv for s in self.active.values()), self.p.decision_timeout_s, now):
            assert conv.pending is not None
            waited = now - conv.pending.created_at
            log.warning("no decision for %s after %.0fs: re-sending", conv.pending.turn_id, waited)
            self._resend(conv)
