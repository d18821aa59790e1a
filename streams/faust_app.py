"""The stream workers' faust app: an app whose producer is idempotent, and its broker
and security settings from ``KafkaSettings``. faust is used here and nowhere else
(the producers use aiokafka through :mod:`producers.channel`, the rest kafka-python
through :mod:`corpusfactory.kafka_clients`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faust
from faust.transport.drivers.aiokafka import Producer as FaustAIOKafkaProducer
from faust.types import ProducerT

from corpusfactory.kafka_clients import bootstrap_servers, ssl_context, uses_sasl, uses_ssl
from corpusfactory.settings import KafkaSettings


def faust_broker_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """``faust.App`` keyword arguments: ``broker`` and, when secured, ``broker_credentials``."""
    kwargs: dict[str, Any] = {
        "broker": ";".join(f"kafka://{server}" for server in bootstrap_servers(bootstrap))
    }
    credentials = _faust_credentials(kafka)
    if credentials is not None:
        kwargs["broker_credentials"] = credentials
    return kwargs


class _IdempotentFaustProducer(FaustAIOKafkaProducer):
    """Faust's aiokafka producer with idempotence on.

    faust-streaming has a setting for acks (``producer_acks``) but turns idempotence
    on only for ``processing_guarantee="exactly_once"``, i.e. with transactions.
    A worker's sends (scored turns, decisions, dead letters) are retried by aiokafka
    when a partition leader fails over; idempotence keeps such a retry from writing
    the record twice.
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "enable_idempotence": True}


class ReliableFaustApp(faust.App):
    """A ``faust.App`` whose producer uses idempotence; create it with
    ``producer_acks=-1`` (acks=all), which idempotence requires."""

    def _new_producer(self) -> ProducerT:
        if self.transport.Producer is not FaustAIOKafkaProducer:
            return super()._new_producer()  # another driver: left as it is
        return _IdempotentFaustProducer(self.transport, loop=self.loop, beacon=self.beacon)


def _faust_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    # Faust derives security_protocol from the credentials' class and whether an
    # SSL context is attached: SASLCredentials + context means SASL_SSL.
    context = ssl_context(kafka) if uses_ssl(kafka) else None
    if uses_sasl(kafka):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
