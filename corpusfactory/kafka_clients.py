"""Kafka client configuration and topic setup, from one ``KafkaSettings``.

Three client libraries talk to Kafka in this project: aiokafka (async producers
and consumers), kafka-python (admin and synchronous tools) and faust-streaming
(the stream workers, on top of aiokafka). Each spells security settings
differently; the builders here translate the one set of settings for each, so a
SASL/SSL cluster is configured in a single place.

``resolve_bootstrap`` says where Kafka is (a configured cluster, or the embedded
broker under the state directory) and ``ensure_topics`` creates the contract
topics there.
"""

from __future__ import annotations

import ssl
from typing import Any

import faust
from aiokafka.helpers import create_ssl_context
from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from corpusfactory.broker import EmbeddedBroker
from corpusfactory.contract import ALL_TOPICS, SCORED, SINGLE_PARTITION_TOPICS
from corpusfactory.errors import BrokerError, ConfigError
from corpusfactory.settings import KafkaSettings, Settings

# turns.scored has one partition: the admission stage is a single writer, so
# the order of admissions (and thus of duplicate detection) is total.
SCORED_PARTITIONS = 1


# --------------------------------------------------------------------------- client kwargs


def bootstrap_servers(bootstrap: str) -> list[str]:
    """``"h1:p1, h2:p2"`` -> ``["h1:p1", "h2:p2"]``."""
    servers = [s.strip() for s in bootstrap.split(",") if s.strip()]
    if not servers:
        raise ConfigError([f"kafka.bootstrap_servers: no host:port in {bootstrap!r}"])
    return servers


def _uses_ssl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in ("SSL", "SASL_SSL")


def _uses_sasl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol.startswith("SASL")


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """An SSL context from the configured CA, certificate and key files."""
    try:
        # aiokafka's helper verifies the broker's hostname, as kafka-python does
        # by default, so all three clients apply the same TLS checks.
        return create_ssl_context(
            cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile
        )
    except (OSError, ssl.SSLError) as exc:
        files = f"ssl_cafile={kafka.ssl_cafile}, ssl_certfile={kafka.ssl_certfile}, " + (
            f"ssl_keyfile={kafka.ssl_keyfile}"
        )
        raise ConfigError([f"kafka: cannot load the SSL files ({files}): {exc}"]) from exc


def _sasl_fields(kafka: KafkaSettings) -> dict[str, Any]:
    # aiokafka and kafka-python share these names (also for SCRAM).
    return {
        "sasl_mechanism": kafka.sasl_mechanism,
        "sasl_plain_username": kafka.sasl_username,
        "sasl_plain_password": kafka.sasl_password,
    }


def aiokafka_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaProducer`` / ``AIOKafkaConsumer``."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(bootstrap),
        "security_protocol": kafka.security_protocol,
    }
    if _uses_ssl(kafka):
        # aiokafka takes no file paths, only a ready SSL context.
        kwargs["ssl_context"] = ssl_context(kafka)
    if _uses_sasl(kafka):
        kwargs.update(_sasl_fields(kafka))
    return kwargs


def kafka_python_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for kafka-python's ``KafkaAdminClient``, producer and consumer."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(bootstrap),
        "security_protocol": kafka.security_protocol,
    }
    if _uses_ssl(kafka):
        # kafka-python rejects unknown keys, so only the files that are set go in.
        files = {
            "ssl_cafile": kafka.ssl_cafile,
            "ssl_certfile": kafka.ssl_certfile,
            "ssl_keyfile": kafka.ssl_keyfile,
        }
        kwargs.update({k: v for k, v in files.items() if v is not None})
    if _uses_sasl(kafka):
        kwargs.update(_sasl_fields(kafka))
    return kwargs


def faust_broker_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """``faust.App`` keyword arguments: ``broker`` and, when secured, ``broker_credentials``."""
    kwargs: dict[str, Any] = {
        "broker": ";".join(f"kafka://{server}" for server in bootstrap_servers(bootstrap))
    }
    credentials = _faust_credentials(kafka)
    if credentials is not None:
        kwargs["broker_credentials"] = credentials
    return kwargs


def _faust_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    # Faust derives security_protocol from the credentials' class and whether an
    # SSL context is attached: SASLCredentials + context means SASL_SSL.
    context = ssl_context(kafka) if _uses_ssl(kafka) else None
    if _uses_sasl(kafka):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


# --------------------------------------------------------------------------- bootstrap


def resolve_bootstrap(settings: Settings, start_embedded: bool = True) -> str:
    """The bootstrap servers: the configured cluster, else the embedded broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    broker = embedded_broker(settings)
    address = broker.bootstrap
    if address is not None and broker.is_running():
        return address
    if not start_embedded:
        raise BrokerError("broker not running: run `corpusfactory broker start`")
    return broker.start()


def embedded_broker(settings: Settings) -> EmbeddedBroker:
    """The embedded broker living under the settings' state directory."""
    return EmbeddedBroker(
        settings.state_path,
        port=settings.kafka.embedded_port,
        controller_port=settings.kafka.embedded_controller_port,
    )


# --------------------------------------------------------------------------- topics


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Full topic name -> partition count, for every contract topic."""
    return {
        settings.topic(name): 1 if name in SINGLE_PARTITION_TOPICS else settings.kafka.partitions
        for name in ALL_TOPICS
    }


def ensure_topics(settings: Settings, bootstrap: str, *, timeout_s: float = 30.0) -> None:
    """Create the contract topics that are missing. Existing topics are left as they are."""
    wanted = topic_partitions(settings)
    try:
        admin = KafkaAdminClient(
            **kafka_python_kwargs(settings.kafka, bootstrap),
            client_id="corpusfactory-admin",
            bootstrap_timeout_ms=int(timeout_s * 1000),
            request_timeout_ms=int(timeout_s * 1000),
        )
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc!r}") from exc
    try:
        _create_missing(admin, settings, wanted, timeout_s)
        _check_scored(admin, settings)
    except KafkaError as exc:
        raise BrokerError(f"cannot create the topics on Kafka at {bootstrap}: {exc!r}") from exc
    finally:
        admin.close()


def _create_missing(
    admin: KafkaAdminClient, settings: Settings, wanted: dict[str, int], timeout_s: float
) -> None:
    missing = sorted(set(wanted) - set(admin.list_topics()))
    if not missing:
        return
    config = {"max.message.bytes": str(settings.kafka.max_message_bytes)}
    request = {
        name: {
            "num_partitions": wanted[name],
            "replication_factor": settings.kafka.replication_factor,
            "configs": config,
        }
        for name in missing
    }
    # Errors are read per topic: another process creating the same topic at the
    # same moment (TopicAlreadyExists) is success, anything else is not.
    response = admin.create_topics(request, timeout_ms=int(timeout_s * 1000), raise_errors=False)
    problems = [
        f"{t['name']}: error {t['error_code']} {t.get('error_message') or ''}".rstrip()
        for t in response["topics"]
        if t["error_code"] not in (0, TopicAlreadyExistsError.errno)
    ]
    if problems:
        raise BrokerError("cannot create Kafka topics: " + "; ".join(problems))
    # Creation is acknowledged before every partition has a leader; producing
    # right away would fail with UnknownTopicOrPartition.
    admin.wait_for_topics(missing, timeout_ms=int(timeout_s * 1000))


def _check_scored(admin: KafkaAdminClient, settings: Settings) -> None:
    # A pre-existing turns.scored with more partitions would silently break the
    # single-writer admission order, so refuse to run on it.
    name = settings.topic(SCORED)
    (info,) = admin.describe_topics([name])
    count = len(info.get("partitions") or [])
    if count != SCORED_PARTITIONS:
        raise BrokerError(
            f"topic {name} has {count} partitions but must have exactly {SCORED_PARTITIONS} "
            "(the admission stage is its single writer); delete and recreate it"
        )
