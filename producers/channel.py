"""The Kafka side every producer shares: candidate turns out, decisions in, finished
conversations published, undecodable decisions dead-lettered, stale turns found.

The self-chat producer (:mod:`producers.service`) and the ingest publisher
(:mod:`producers.ingest.publish`) drive their conversations differently (one
generates each turn, the other replays a refined transcript) but talk to Kafka
through this one channel, on aiokafka:

* :meth:`TurnChannel.start` takes every partition of ``turns.decisions`` (manual
  assignment: a producer's conversations hash anywhere) and positions each before
  any candidate leaves, so no decision for one of its candidates can be missed: at
  the group's committed offset (``group``; a restarted producer resumes there), else
  the current end;
* :meth:`send` writes candidates (acks=all, idempotent) and waits until all are
  acknowledged;
* :meth:`decisions` polls and decodes; an undecodable record is dead-lettered (the
  self-chat producer, ``dead_letter=True``) or skipped with a warning (ingest: the
  self-chat producers reading the same topic dead-letter it);
* :meth:`commit` commits what was polled, once the caller has applied it;
* :meth:`publish` writes a closed conversation to ``corpus.accepted`` when
  :func:`should_publish` says so;
* :func:`stale` lists the conversations whose pending turn waited too long (a lost
  worker): the caller re-sends it with the same turn id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from corpusfactory import contract
from corpusfactory.contract import ContractError, Decision, encode
from corpusfactory.kafka_clients import (
    bootstrap_servers,
    sasl_fields,
    ssl_context,
    uses_sasl,
    uses_ssl,
)
from corpusfactory.settings import KafkaSettings, ProducerSettings, Settings
from producers.conversation import Conversation

log = logging.getLogger(__name__)


def should_publish(conv: Conversation, p: ProducerSettings) -> bool:
    """A closed conversation goes to the accepted corpus when it finished, or when it
    was truncated with at least ``producer.min_truncated_messages`` accepted messages
    and ``producer.publish_truncated`` is on."""
    if not conv.messages:
        return False
    return conv.status == "finished" or (
        p.publish_truncated and len(conv.messages) >= p.min_truncated_messages
    )


def stale(
    conversations: Iterable[Conversation], timeout_s: float, now: float
) -> list[Conversation]:
    """The conversations whose pending turn has waited more than ``timeout_s``."""
    return [
        c for c in conversations if c.pending is not None and now - c.pending.created_at > timeout_s
    ]


def aiokafka_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaProducer`` / ``AIOKafkaConsumer``."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(bootstrap),
        "security_protocol": kafka.security_protocol,
    }
    if uses_ssl(kafka):
        # aiokafka takes no file paths, only a ready SSL context.
        kwargs["ssl_context"] = ssl_context(kafka)
    if uses_sasl(kafka):
        kwargs.update(sasl_fields(kafka))
    return kwargs


class TurnChannel:
    """One producer's clients: an idempotent aiokafka producer and a decision consumer."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        group: str | None,
        dead_letter: bool,
        stage: str = "producer",
    ) -> None:
        self.settings = settings
        self.group = group
        self.dead_letter = dead_letter
        self.stage = stage
        kw = aiokafka_kwargs(settings.kafka, bootstrap)
        self.producer = AIOKafkaProducer(**kw, acks="all", enable_idempotence=True, linger_ms=5)
        self.consumer = AIOKafkaConsumer(
            **kw,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            max_poll_records=500,
        )
        self._polled = False

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        topic = self.settings.topic(contract.DECISIONS)
        parts = await self.producer.partitions_for(topic)  # waits for the topic's metadata
        if not parts:
            raise ContractError(f"topic {topic!r} has no partitions: is it created?")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        ends = await self.consumer.end_offsets(tps)
        for tp in tps:
            committed = await self.consumer.committed(tp) if self.group else None
            self.consumer.seek(tp, committed if committed is not None else ends[tp])

    async def stop(self) -> None:
        await self.producer.stop()
        await self.consumer.stop()

    async def send(self, candidates: Sequence[contract.CandidateTurn]) -> None:
        """Write ``candidates`` to ``turns.candidates``; returns once all are acknowledged."""
        topic = self.settings.topic(contract.CANDIDATES)
        sends = [
            await self.producer.send(topic, key=c.conversation_id.encode(), value=encode(c))
            for c in candidates
        ]
        await asyncio.gather(*sends)

    async def decisions(self, wait_ms: int) -> list[Decision]:
        """The decisions that arrive within ``wait_ms``, decoded, in arrival order."""
        out: list[Decision] = []
        batches = await self.consumer.getmany(timeout_ms=wait_ms)
        for records in batches.values():
            for rec in records:
                decision = await self._decode(rec)
                if decision is not None:
                    out.append(decision)
        self._polled = self._polled or bool(batches)
        return out

    async def commit(self) -> None:
        """Commit the decision offsets polled so far (a group's producer only)."""
        if self.group and self._polled:
            await self.consumer.commit()
        self._polled = False

    async def publish(
        self, conv: Conversation, p: ProducerSettings, producer_id: str, generator: str
    ) -> bool:
        """Write a closed conversation to ``corpus.accepted`` when :func:`should_publish`;
        True when it was written."""
        if not should_publish(conv, p):
            return False
        record = conv.to_accepted(producer_id, generator)
        await self.producer.send_and_wait(
            self.settings.topic(contract.ACCEPTED),
            key=conv.conversation_id.encode(),
            value=encode(record),
        )
        return True

    async def _decode(self, rec: Any) -> Decision | None:
        try:
            return contract.decode_decision(rec.value)
        except ContractError as exc:
            if not self.dead_letter:
                log.warning("skipping an undecodable decision at offset %s: %s", rec.offset, exc)
                return None
            dl = contract.dead_letter(
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=rec.key,
                value=rec.value,
                error=exc,
                stage=self.stage,
            )
            await self.producer.send_and_wait(
                self.settings.topic(contract.DEADLETTER), key=rec.key, value=encode(dl)
            )
            return None
