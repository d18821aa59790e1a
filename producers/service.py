"""The self-chat producer service: generate, send candidates, apply decisions.

One generator writes both sides of many conversations at once (method.md §1).
Each round, every conversation without a pending turn gets its next message
from one batched ``generate`` call, run in a thread off the event loop. The
candidates go to ``turns.candidates`` keyed by conversation id; decisions come
back on ``turns.decisions``. An accepted turn is appended; a rejected one is
generated again, up to ``producer.retry_cap`` times, after which the
conversation is closed as truncated. A conversation that reaches its target
length (uniform in ``min_messages..max_messages``) is published whole to
``corpus.accepted``.

Crash safety: the conversation state lives in SQLite (``producers.state``) and
the pending turn is saved before its candidate is sent. Decision offsets are
committed only after the state they changed is saved. On restart, pending
candidates are sent again under the same turn ids (admission is idempotent on
turn id), and finished conversations not yet published are published.

Run with ``corpusfactory produce``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corpusfactory import contract
from corpusfactory.chatformat import ChatFormat
from corpusfactory.contract import Decision
from corpusfactory.errors import UnavailableError
from corpusfactory.metrics import ProducerMetrics
from corpusfactory.seeds import SeedConversation, load_seeds
from corpusfactory.settings import Settings
from producers.channel import TurnChannel, stale
from producers.conversation import Conversation, Outcome, draw_target_length
from producers.generators.base import Generator
from producers.state import ConversationStore

log = logging.getLogger(__name__)

GENERATOR_RETRY_MAX_S = 30.0  # back-off cap while the generator's server is unavailable

SOURCE = "selfchat"


@dataclass
class ProducerStats:
    """What one run of the producer did; printed by the demo and the benchmark."""

    started: int = 0
    finished: int = 0
    truncated: int = 0
    published: int = 0
    candidates_sent: int = 0
    resent: int = 0
    empty_generations: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    generate_s: float = 0.0
    stage_s: Counter[str] = field(default_factory=Counter)  # embed/score/admit, summed
    roundtrip_s: float = 0.0  # candidate sent -> decision applied, summed over decisions
    generated: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["decisions"] = dict(self.decisions)
        d["stage_s"] = dict(self.stage_s)
        return d


DecisionObserver = Callable[[Decision, str, ProducerStats], None]


class SelfChatProducer:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        generator: Generator,
        metrics: ProducerMetrics | None = None,
        observer: DecisionObserver | None = None,
    ) -> None:
        self.settings = settings
        # Called with each decision applied to one of this producer's turns, the turn's
        # text and the running stats (the demo prints progress and examples from it).
        self.observer = observer
        self.p = settings.producer
        self.bootstrap = bootstrap
        self.generator = generator
        self.fmt = ChatFormat(self.p.user_tag, self.p.assistant_tag)
        self.stats = ProducerStats()
        self.metrics = metrics or ProducerMetrics()
        self.metrics.start(self.p.producer_id, generator.id)
        state_dir = settings.state_path / "producer"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = ConversationStore(state_dir / f"{self.p.producer_id}.sqlite")
        # Seeded for reproducible runs, and by how many conversations the state already
        # holds: a restarted producer must never draw the ids of its earlier
        # conversations again (a turn id names one text; another text under the same
        # id is a conflict the admitter dead-letters).
        held = sum(v for k, v in self.store.counts().items() if k != "published")
        self.rng = random.Random(f"{self.p.rng_seed}:{held}")
        self.seeds: list[SeedConversation] = load_seeds(self.p.seed_file, self.p.seed_format)
        self.seed_by_id = {s.id: s for s in self.seeds}
        self.active: dict[str, Conversation] = {}

    # -- set-up ---------------------------------------------------------------

    def _new_conversation(self) -> Conversation:
        k = min(self.p.fewshot_k, len(self.seeds))
        examples = self.rng.sample(self.seeds, k) if k else []
        conversation_id = ""
        while not conversation_id or self.store.get(conversation_id) is not None:
            conversation_id = f"{self.p.producer_id}-{uuid.UUID(int=self.rng.getrandbits(128)).hex}"
        conv = Conversation(
            conversation_id=conversation_id,
            source=SOURCE,
            target_length=draw_target_length(self.rng, self.p.min_messages, self.p.max_messages),
            seed_ids=[s.id for s in examples],
            created_at=time.time(),
            retry_cap=self.p.retry_cap,
        )
        self.stats.started += 1
        return conv

    # -- the loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> ProducerStats:
        t0 = time.perf_counter()
        stop = stop or asyncio.Event()
        group = f"{self.settings.kafka.topic_prefix}producer-{self.p.producer_id}"
        channel = TurnChannel(self.settings, self.bootstrap, group=group, dead_letter=True)
        try:
            await channel.start()
            for conv in self.store.load_unpublished():
                await self._publish(channel, conv)
            self.active = {c.conversation_id: c for c in self.store.load_active()}
            self._gauge_active()
            resend = [c for c in self.active.values() if c.pending is not None]
            await self._send(channel, [c.pending_candidate() for c in resend])
            for _ in resend:
                self._count_resend()
            if resend:
                log.info(
                    "resumed %d conversations, re-sent %d pending", len(self.active), len(resend)
                )
            gen_failures = 0
            while not stop.is_set():
                self._fill_slots()
                if not self.active:
                    break
                # Decisions are applied while the generator thread works, so a turn's
                # decision never waits for the next batch to finish generating.
                generating = asyncio.create_task(self._generate_round(channel))
                while not generating.done():
                    await self._poll_decisions(channel, wait_ms=100)
                try:
                    await generating
                except UnavailableError as exc:
                    # The generator's server is down or overloaded beyond its own
                    # retries: nothing of this round was sent; wait, keep applying
                    # decisions, and generate again. The producer never stops on it.
                    gen_failures += 1
                    delay = min(2.0**gen_failures, GENERATOR_RETRY_MAX_S)
                    log.error(
                        "generator unavailable (try %d): %s; retrying in %.0fs",
                        gen_failures,
                        exc,
                        delay,
                    )
                    deadline = time.monotonic() + delay
                    while time.monotonic() < deadline and not stop.is_set():
                        await self._poll_decisions(channel, wait_ms=200)
                    continue
                gen_failures = 0
                await self._poll_decisions(channel)
                await self._resend_stale(channel)
        finally:
            await channel.stop()
            self.store.close()
            self.stats.wall_s = time.perf_counter() - t0
        return self.stats

    def _fill_slots(self) -> None:
        limit = self.p.conversations
        counts = self.store.counts()
        done = counts.get("finished", 0) + counts.get("truncated", 0)
        while len(self.active) < self.p.in_flight:
            if limit and done + len(self.active) >= limit:
                break
            conv = self._new_conversation()
            self.store.save(conv)
            self.active[conv.conversation_id] = conv
        self._gauge_active()

    async def _generate_round(self, channel: TurnChannel) -> None:
        idle = [c for c in self.active.values() if c.pending is None]
        if not idle:
            return
        prompts = [
            self.fmt.prompt(
                c.history(),
                c.next_role(),
                [list(self.seed_by_id[s].messages) for s in c.seed_ids if s in self.seed_by_id],
            )
            for c in idle
        ]
        t = time.perf_counter()
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(
            None, self.generator.generate, prompts, self.p.generation, self.fmt.stop_strings
        )
        took = time.perf_counter() - t
        self.stats.generate_s += took
        self.stats.generated += len(prompts)
        self.metrics.batch.labels("generate").observe(len(prompts))
        self.metrics.stage.labels("generate").observe(took / len(prompts))
        now = time.time()
        to_send = []
        for conv, out in zip(idle, raw, strict=True):
            text = self.fmt.clean_generation(out)
            if not text:
                # Nothing usable was generated: a rejection that never left the producer.
                self.stats.empty_generations += 1
                self.metrics.empty.labels(self.p.producer_id).inc()
                if conv.reject_unsent(now) is Outcome.TRUNCATED:
                    await self._close(channel, conv)
                continue
            to_send.append(conv.new_pending(text, self.generator.id, now, self.p.producer_id))
            self.store.save(conv)  # pending is durable before the candidate leaves
        await self._send(channel, to_send)
        for _ in to_send:
            self.metrics.generated.labels(self.p.producer_id, self.generator.id).inc()

    async def _send(self, channel: TurnChannel, cands: list[contract.CandidateTurn]) -> None:
        await channel.send(cands)
        self.stats.candidates_sent += len(cands)

    async def _poll_decisions(self, channel: TurnChannel, wait_ms: int | None = None) -> None:
        if wait_ms is None:
            # Wait longer while every conversation is waiting on a decision.
            waiting = all(c.pending is not None for c in self.active.values())
            wait_ms = 1000 if waiting else 50
        for decision in await channel.decisions(wait_ms):
            await self._on_decision(channel, decision)
        await channel.commit()

    async def _on_decision(self, channel: TurnChannel, decision: Decision) -> None:
        conv = self.active.get(decision.conversation_id)
        if conv is None:
            return  # another producer's conversation, or one already closed
        sent_at = conv.pending.created_at if conv.pending else 0.0
        text = conv.pending.text if conv.pending else ""
        outcome = conv.apply(decision)
        if outcome is Outcome.IGNORED:
            return
        self.stats.decisions[decision.reason] += 1
        self.stats.stage_s.update(decision.stage_s or {})
        if sent_at:
            roundtrip = max(0.0, time.time() - sent_at)
            self.stats.roundtrip_s += roundtrip
            self.metrics.stage.labels("roundtrip").observe(roundtrip)
        if conv.done:
            await self._close(channel, conv)
        else:
            self.store.save(conv)
        if self.observer is not None:
            try:
                self.observer(decision, text, self.stats)
            except Exception:  # a display must never stop the producer
                log.exception("decision observer failed")

    async def _close(self, channel: TurnChannel, conv: Conversation) -> None:
        self.store.save(conv)
        self.active.pop(conv.conversation_id, None)
        if conv.status == "finished":
            self.stats.finished += 1
        else:
            self.stats.truncated += 1
        self.metrics.conversations.labels(self.p.producer_id, conv.status).inc()
        self._gauge_active()
        await self._publish(channel, conv)

    async def _publish(self, channel: TurnChannel, conv: Conversation) -> None:
        if await channel.publish(conv, self.p, self.p.producer_id, self.generator.id):
            self.stats.published += 1
        self.store.mark_published(conv.conversation_id)

    async def _resend_stale(self, channel: TurnChannel) -> None:
        """Re-send candidates that waited too long (a lost worker); same turn id."""
        now = time.time()
        again = stale(self.active.values(), self.p.decision_timeout_s, now)
        for conv in again:
            assert conv.pending is not None
            log.warning(
                "no decision for %s after %.0fs: re-sending",
                conv.pending.turn_id,
                now - conv.pending.created_at,
            )
            conv.pending.created_at = now
            self.store.save(conv)
        await self._send(channel, [c.pending_candidate() for c in again])
        for _ in again:
            self._count_resend()

    def _count_resend(self) -> None:
        self.stats.resent += 1
        self.metrics.resent.labels(self.p.producer_id).inc()

    def _gauge_active(self) -> None:
        self.metrics.active.labels(self.p.producer_id).set(len(self.active))
