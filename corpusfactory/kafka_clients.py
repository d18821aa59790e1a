"""Kafka from one ``KafkaSettings``: the security settings, topic setup, and the
kafka-python helpers every synchronous component uses.

Three client libraries talk to Kafka, each in one layer (``make check`` holds it):
faust-streaming in the stream workers (:mod:`streams.faust_app`), aiokafka in the
producers' channel (:mod:`producers.channel`), and kafka-python here, for the
trainer, evaluator, builder, model follower, corpus writer and lag metrics
(``consumer``, ``assign``, ``read_until``, ``announce``) and for admin
(``ensure_topics``). Each library spells security settings differently; this module
holds the one reading of them (``bootstrap_servers``, ``ssl_context``,
``uses_ssl``, ``uses_sasl``, ``sasl_fields``) that the other two layers build on, so
a SASL/SSL cluster is configured in a single place.

Where Kafka is (a configured cluster, or the embedded broker) is
``corpusfactory.engines.broker``'s ``resolve_bootstrap``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, TopicAlreadyExistsError

from corpusfactory.contract import ALL_TOPICS, SCORED, SINGLE_PARTITION_TOPICS
from corpusfactory.errors import BrokerError, ConfigError, ContractError
from corpusfactory.settings import KafkaSettings, Settings

T = TypeVar("T")

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


def uses_ssl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol.startswith("SASL")


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """An SSL context from the configured CA, certificate and key files."""
    try:
        # Verifies the broker's certificate and hostname, as kafka-python does by
        # default, so all three clients apply the same TLS checks.
        context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        if kafka.ssl_certfile:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
        return context
    except (OSError, ssl.SSLError) as exc:
        files = f"ssl_cafile={kafka.ssl_cafile}, ssl_certfile={kafka.ssl_certfile}, " + (
            f"ssl_keyfile={kafka.ssl_keyfile}"
        )
        raise ConfigError([f"kafka: cannot load the SSL files ({files}): {exc}"]) from exc


def sasl_fields(kafka: KafkaSettings) -> dict[str, Any]:
    # aiokafka and kafka-python share these names (also for SCRAM).
    return {
        "sasl_mechanism": kafka.sasl_mechanism,
        "sasl_plain_username": kafka.sasl_username,
        "sasl_plain_password": kafka.sasl_password,
    }


def kafka_python_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for kafka-python's ``KafkaAdminClient``, producer and consumer."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(bootstrap),
        "security_protocol": kafka.security_protocol,
    }
    if uses_ssl(kafka):
        # kafka-python rejects unknown keys, so only the files that are set go in.
        files = {
            "ssl_cafile": kafka.ssl_cafile,
            "ssl_certfile": kafka.ssl_certfile,
            "ssl_keyfile": kafka.ssl_keyfile,
        }
        kwargs.update({k: v for k, v in files.items() if v is not None})
    if uses_sasl(kafka):
        kwargs.update(sasl_fields(kafka))
    return kwargs


# Every producer of the pipeline: a write is acknowledged only once all in-sync
# replicas hold it (at least min.insync.replicas of them), and the retries that a
# failover causes never write a record twice.
RELIABLE_PRODUCER: dict[str, Any] = {"acks": "all", "enable_idempotence": True}


def kafka_python_producer_kwargs(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for kafka-python's ``KafkaProducer``: the client ones, acks=all
    and idempotence."""
    return {**kafka_python_kwargs(kafka, bootstrap), **RELIABLE_PRODUCER}


# --------------------------------------------------------------------------- kafka-python helpers
#
# The synchronous side of the project (trainer, evaluator, builder, model follower,
# corpus writer, metrics) reaches Kafka through kafka-python and these helpers only:
# one consumer builder, one way to assign and position partitions, one bounded
# poll-and-decode loop, one announcement. The stream workers use faust
# (``ReliableFaustApp``) and the producers aiokafka (``aiokafka_kwargs``).


def consumer(kafka: KafkaSettings, bootstrap: str, **options: Any) -> KafkaConsumer:
    """A kafka-python consumer that commits nothing by itself (``enable_auto_commit``
    off unless ``options`` say otherwise); ``options`` go to ``KafkaConsumer``."""
    return KafkaConsumer(
        **kafka_python_kwargs(kafka, bootstrap), **{"enable_auto_commit": False, **options}
    )


def assign(
    client: KafkaConsumer,
    topic: str,
    start: Literal["committed", "beginning", "end"] = "committed",
    partitions: Sequence[int] | None = None,
    fallback: Literal["beginning", "end"] = "beginning",
) -> list[TopicPartition]:
    """Assign ``topic``'s partitions (all of them unless ``partitions``) and position
    each: at the group's committed offset (``fallback`` where the group has none), the
    beginning or the end. Raises BrokerError when the topic does not exist."""
    if partitions is None:
        found = client.partitions_for_topic(topic)
        if not found:
            raise BrokerError(f"topic {topic} does not exist (run the workers first)")
        partitions = sorted(found)
    tps = [TopicPartition(topic, p) for p in partitions]
    client.assign(tps)
    for tp in tps:
        where = start
        if start == "committed" and client.committed(tp) is None:
            where = fallback
        if where == "end":
            client.seek_to_end(tp)
        elif where == "beginning":
            client.seek_to_beginning(tp)
    return tps


def read_until(
    client: KafkaConsumer,
    goal: Mapping[TopicPartition, int],
    decode: Callable[[Any], T],
    timeout_s: float | None = None,
) -> list[tuple[TopicPartition, int, T]]:
    """Poll the assigned partitions until each reaches its ``goal`` offset, decoding
    every record below it with ``decode``; a record ``decode`` rejects with
    ContractError is skipped. Returns (partition, offset, value) in arrival order.
    Raises TimeoutError after ``timeout_s`` (None: no limit)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out: list[tuple[TopicPartition, int, T]] = []
    while any(client.position(tp) < end for tp, end in goal.items()):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"could not read {sorted(map(str, goal))} to {dict(goal)}")
        for tp, records in client.poll(timeout_ms=1000).items():
            for rec in records:
                if tp in goal and rec.offset >= goal[tp]:
                    continue
                try:
                    out.append((tp, rec.offset, decode(rec.value)))
                except ContractError:
                    continue
    return out


def announce(kafka: KafkaSettings, bootstrap: str, topic: str, key: str, value: bytes) -> None:
    """Send one record with the reliable producer settings and wait until it is
    acknowledged (a snapshot or build announcement: rare, so no producer is kept)."""
    producer = KafkaProducer(**kafka_python_producer_kwargs(kafka, bootstrap))
    try:
        producer.send(topic, key=key.encode(), value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


# --------------------------------------------------------------------------- topics


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Full topic name -> partition count, for every contract topic."""
    return {
        settings.topic(name): 1 if name in SINGLE_PARTITION_TOPICS else settings.kafka.partitions
        for name in ALL_TOPICS
    }


def ensure_topics(settings: Settings, bootstrap: str, *, timeout_s: float = 30.0) -> None:
    """Create the contract topics that are missing, replicated as ``topic_replication``
    says. Existing topics are left as they are."""
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
        _check_scored(admin, settings, timeout_s)
    except KafkaError as exc:
        raise BrokerError(f"cannot create the topics on Kafka at {bootstrap}: {exc!r}") from exc
    finally:
        admin.close()


def majority_of(replicas: int) -> int:
    """The smallest majority of ``replicas``: the min.insync.replicas that lets a
    write acknowledged by acks=all survive the loss of any minority of the replicas."""
    return replicas // 2 + 1


def topic_replication(settings: Settings, live_brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for the topics ``ensure_topics`` creates.

    Unset, the replication factor is min(3, the brokers alive now) (1 on the embedded
    broker, 3 on a cluster of three or more) and min.insync.replicas a majority of
    the replicas (1 of 1, 2 of 2, 2 of 3): with acks=all, a write is acknowledged
    only once a majority holds it, and the topic keeps taking writes while a
    minority of its replicas is down.
    """
    kafka = settings.kafka
    replicas = kafka.replication_factor or max(1, min(3, live_brokers))
    min_isr = kafka.min_insync_replicas or majority_of(replicas)
    if min_isr > replicas:
        raise ConfigError(
            [
                f"kafka.min_insync_replicas ({min_isr}) exceeds the replication factor "
                f"({replicas}): no write could ever be acknowledged"
            ]
        )
    return replicas, min_isr


def _create_missing(
    admin: KafkaAdminClient, settings: Settings, wanted: dict[str, int], timeout_s: float
) -> None:
    missing = sorted(set(wanted) - set(admin.list_topics()))
    if not missing:
        return
    live = len(admin.describe_cluster().get("brokers") or [])
    replicas, min_isr = topic_replication(settings, live)
    config = {
        "max.message.bytes": str(settings.kafka.max_message_bytes),
        "min.insync.replicas": str(min_isr),
    }
    request = {
        name: {"num_partitions": wanted[name], "replication_factor": replicas, "configs": config}
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


def _check_scored(admin: KafkaAdminClient, settings: Settings, timeout_s: float) -> None:
    # A pre-existing turns.scored with more partitions would silently break the
    # single-writer admission order, so refuse to run on it.
    name = settings.topic(SCORED)
    deadline = time.monotonic() + timeout_s
    while True:
        (info,) = admin.describe_topics([name])
        # On a cluster, a broker may not know a topic created a moment ago through
        # another one (its metadata follows the controller's a little later).
        if info.get("error_code") == 0 and info.get("partitions"):
            break
        if time.monotonic() >= deadline:
            raise BrokerError(f"topic {name} is not visible on Kafka after {timeout_s:g}s")
        time.sleep(0.2)
    count = len(info["partitions"])
    if count != SCORED_PARTITIONS:
        raise BrokerError(
            f"topic {name} has {count} partitions but must have exactly {SCORED_PARTITIONS} "
            "(the admission stage is its single writer); delete and recreate it"
        )
