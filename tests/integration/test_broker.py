"""The embedded Kafka broker, topic setup and client configuration, against a real broker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from corpusfactory.cache import cache_root, models_root
from corpusfactory.contract import (
    ACCEPTED,
    ALL_TOPICS,
    CANDIDATES,
    SCORED,
    SINGLE_PARTITION_TOPICS,
)
from corpusfactory.engines.broker import (
    POM_PATH,
    EmbeddedBroker,
    ensure_jars,
    java_executable,
    resolve_bootstrap,
)
from corpusfactory.errors import BrokerError, ConfigError, JavaMissingError
from corpusfactory.kafka_clients import ensure_topics, kafka_python_kwargs
from corpusfactory.settings import Settings, load_settings
from producers.channel import aiokafka_kwargs
from streams.faust_app import faust_broker_kwargs

pytestmark = pytest.mark.integration


def _settings(state_dir: Path, prefix: str = "", **kafka: object) -> Settings:
    # environ={} so a KAFKA_BOOTSTRAP_SERVERS of the shell cannot redirect the tests.
    return load_settings(
        environ={},
        overrides={"state_dir": str(state_dir), "kafka": {"topic_prefix": prefix, **kafka}},
    )


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


def _consume(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    """The first ``count`` messages of the topic (fewer if they do not come in 30 s)."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend((r.key, r.value) for r in records)
        return got
    finally:
        consumer.close()


# --------------------------------------------------------------------------- lifecycle


def test_lifecycle_restart_keeps_ports_and_messages(tmp_path: Path, topic_prefix: str) -> None:
    settings = _settings(tmp_path / "state", topic_prefix)
    broker = EmbeddedBroker(settings.state_path)
    assert not broker.is_running()
    assert broker.status()["running"] is False
    with pytest.raises(BrokerError, match="broker not running: run `corpusfactory broker start`"):
        resolve_bootstrap(settings, start_embedded=False)
    try:
        address = resolve_bootstrap(settings)  # starts the embedded broker
        status = broker.status()
        assert status["running"] is True
        assert status["bootstrap"] == address == broker.bootstrap
        assert address.startswith("127.0.0.1:")
        assert status["data_dir"] == str(settings.state_path / "kafka" / "data")
        assert broker.is_running()

        # A second start, from another handle, finds the running broker.
        assert EmbeddedBroker(settings.state_path).start() == address
        assert broker.status()["pid"] == status["pid"]
        assert resolve_bootstrap(settings, start_embedded=False) == address

        ensure_topics(settings, address)
        topic = settings.topic(ACCEPTED)
        _produce(address, topic, b"conv-1", b'{"kept": true}')
        ports = json.loads((broker.home / "ports.json").read_text())

        broker.stop()
        assert not broker.is_running()
        stopped = broker.status()
        assert (stopped["running"], stopped["pid"]) == (False, None)
        assert stopped["bootstrap"] == address  # the ports stay remembered
        assert not broker.pid_path.exists()
        broker.stop()  # stopping a stopped broker is fine
        with pytest.raises(BrokerError, match="broker not running"):
            resolve_bootstrap(settings, start_embedded=False)

        # Restart: same ports, same data.
        assert EmbeddedBroker(settings.state_path).start() == address
        assert json.loads((broker.home / "ports.json").read_text()) == ports
        assert _consume(address, topic, 1) == [(b"conv-1", b'{"kept": true}')]
    finally:
        broker.stop()
    assert not broker.is_running()


def test_start_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .* in use"):
            EmbeddedBroker(tmp_path, port=port).start()


def test_failed_start_reports_the_log_and_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORPUSFACTORY_BROKER_JVM_OPTS", "-XX:+NoSuchJvmOptionForTests")
    broker = EmbeddedBroker(tmp_path)
    with pytest.raises(BrokerError, match=r"exited during startup(.|\n)*NoSuchJvmOptionForTests"):
        broker.start(timeout=60)
    assert not broker.pid_path.exists()
    assert broker.status()["running"] is False


def test_explicit_ports_are_used_and_remembered(tmp_path: Path) -> None:
    port, controller_port = _unused_port(), _unused_port()
    broker = EmbeddedBroker(tmp_path, port=port, controller_port=controller_port)
    try:
        assert broker.start() == f"127.0.0.1:{port}"
        assert broker.status()["controller_port"] == controller_port
    finally:
        broker.stop()
    # A later handle without ports reuses the remembered ones.
    assert EmbeddedBroker(tmp_path).bootstrap == f"127.0.0.1:{port}"


# --------------------------------------------------------------------------- java / jars


def test_java_missing_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(JavaMissingError) as info:
        java_executable()
    message = str(info.value)
    assert "Java 17+ is needed for the embedded Kafka broker" in message
    assert "openjdk-17-jre-headless" in message
    assert "KAFKA_BOOTSTRAP_SERVERS" in message
    # start() fails the same way, before anything is launched.
    broker = EmbeddedBroker(tmp_path / "state")
    with pytest.raises(JavaMissingError):
        broker.start()
    assert not broker.pid_path.exists()


def test_java_home_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert java_executable() == str(java)


def test_jars_are_cached_and_an_interrupted_download_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an interrupted download leaves: a libs directory without the marker.
    digest = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()[:16]
    leftover = tmp_path / "kafka" / digest / "libs" / "leftover.jar"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("junk")

    libs = ensure_jars(tmp_path)
    assert libs == leftover.parent
    assert not leftover.exists()
    assert (libs.parent / "COMPLETE").is_file()
    assert any(libs.glob("kafka_2.13-3.9.1.jar"))

    # Complete now: a second call uses the cache even where Maven is unavailable.
    stamp = (libs.parent / "COMPLETE").stat().st_mtime_ns
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert ensure_jars(tmp_path) == libs
    assert (libs.parent / "COMPLETE").stat().st_mtime_ns == stamp


def test_cache_location_and_missing_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORPUSFACTORY_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert models_root() == tmp_path / "cache" / "models"
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BrokerError, match=r"Maven \(mvn\) is needed"):
        ensure_jars()
    assert not list((tmp_path / "cache").glob("kafka/*/COMPLETE"))


# --------------------------------------------------------------------------- topics


def _partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}
    finally:
        admin.close()


def test_ensure_topics_creates_the_contract_topics_idempotently(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, topic_prefix, partitions=3, max_message_bytes=2_000_000)
    names = [settings.topic(t) for t in ALL_TOPICS]
    ensure_topics(settings, kafka_bootstrap)
    expected = {name: 3 for name in names} | {settings.topic(t): 1 for t in SINGLE_PARTITION_TOPICS}
    assert _partition_counts(kafka_bootstrap, names) == expected

    ensure_topics(settings, kafka_bootstrap)  # again: nothing to do, no error
    assert _partition_counts(kafka_bootstrap, names) == expected

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, settings.topic(CANDIDATES))
        configs = admin.describe_configs([resource])["topic"][settings.topic(CANDIDATES)]
    finally:
        admin.close()
    assert configs["max.message.bytes"]["value"] == "2000000"

    # The topics are usable right away.
    _produce(kafka_bootstrap, settings.topic(CANDIDATES), b"k", b"v")
    assert _consume(kafka_bootstrap, settings.topic(CANDIDATES), 1) == [(b"k", b"v")]


def test_ensure_topics_refuses_a_scored_topic_with_several_partitions(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, topic_prefix)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics({settings.topic(SCORED): {"num_partitions": 2}})
        admin.wait_for_topics([settings.topic(SCORED)])
    finally:
        admin.close()
    with pytest.raises(BrokerError, match="has 2 partitions but must have exactly 1"):
        ensure_topics(settings, kafka_bootstrap)


def test_ensure_topics_on_an_unreachable_cluster(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(BrokerError, match="cannot reach Kafka"):
        ensure_topics(settings, f"127.0.0.1:{_unused_port()}", timeout_s=2)


def test_resolve_bootstrap_prefers_a_configured_cluster(tmp_path: Path) -> None:
    settings = _settings(tmp_path, bootstrap_servers="kafka-1:9092,kafka-2:9092")
    assert resolve_bootstrap(settings, start_embedded=False) == "kafka-1:9092,kafka-2:9092"
    assert not (tmp_path / "kafka").exists()  # the embedded broker is not touched


# --------------------------------------------------------------------------- client kwargs


def test_aiokafka_kwargs_round_trip(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, topic_prefix)
    ensure_topics(settings, kafka_bootstrap)
    kwargs = aiokafka_kwargs(settings.kafka, kafka_bootstrap)
    assert kwargs == {"bootstrap_servers": [kafka_bootstrap], "security_protocol": "PLAINTEXT"}
    topic = settings.topic(CANDIDATES)

    async def round_trip() -> bytes | None:
        producer = AIOKafkaProducer(**kwargs)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"ciao", key=b"c1")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, auto_offset_reset="earliest", **kwargs)
        await consumer.start()
        try:
            return (await asyncio.wait_for(consumer.getone(), 30)).value
        finally:
            await consumer.stop()

    assert asyncio.run(round_trip()) == b"ciao"


def test_plaintext_kwargs(tmp_path: Path) -> None:
    kafka = _settings(tmp_path).kafka
    assert kafka_python_kwargs(kafka, "a:1, b:2") == {
        "bootstrap_servers": ["a:1", "b:2"],
        "security_protocol": "PLAINTEXT",
    }
    assert faust_broker_kwargs(kafka, "a:1,b:2") == {"broker": "kafka://a:1;kafka://b:2"}
    with pytest.raises(ConfigError):
        aiokafka_kwargs(kafka, " , ")


def test_sasl_plaintext_kwargs(tmp_path: Path) -> None:
    kafka = _settings(
        tmp_path,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password="s3cret",
    ).kafka
    sasl = {
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "s3cret",
    }
    expected = {"bootstrap_servers": ["h:9092"], "security_protocol": "SASL_PLAINTEXT", **sasl}
    assert aiokafka_kwargs(kafka, "h:9092") == expected
    assert kafka_python_kwargs(kafka, "h:9092") == expected

    faust_kwargs = faust_broker_kwargs(kafka, "h:9092")
    credentials = faust_kwargs["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    # What faust hands to aiokafka from these credentials:
    assert credentials_to_aiokafka_auth(credentials) == {
        "security_protocol": "SASL_PLAINTEXT",
        **sasl,
        "ssl_context": None,
    }
    app = faust.App("kwargs-test", **faust_kwargs)
    assert [str(url) for url in app.conf.broker] == ["kafka://h:9092"]
    assert app.conf.broker_credentials is credentials


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    """A self-signed certificate and key, made with the openssl command."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"ssl_cafile": str(cert), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def test_ssl_kwargs(tmp_path: Path, tls_files: dict[str, str]) -> None:
    kafka = _settings(tmp_path, security_protocol="SSL", **tls_files).kafka
    assert kafka_python_kwargs(kafka, "h:9093") == {
        "bootstrap_servers": ["h:9093"],
        "security_protocol": "SSL",
        **tls_files,
    }
    kwargs = aiokafka_kwargs(kafka, "h:9093")
    context = kwargs.pop("ssl_context")
    assert kwargs == {"bootstrap_servers": ["h:9093"], "security_protocol": "SSL"}
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "localhost"),),)]

    credentials = faust_broker_kwargs(kafka, "h:9093")["broker_credentials"]
    assert isinstance(credentials, faust.SSLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SSL"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)


def test_sasl_ssl_kwargs(tmp_path: Path, tls_files: dict[str, str]) -> None:
    kafka = _settings(
        tmp_path,
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="bob",
        sasl_password="pw",
        ssl_cafile=tls_files["ssl_cafile"],
    ).kafka
    sasl = {"sasl_mechanism": "PLAIN", "sasl_plain_username": "bob", "sasl_plain_password": "pw"}
    assert kafka_python_kwargs(kafka, "h:9094") == {
        "bootstrap_servers": ["h:9094"],
        "security_protocol": "SASL_SSL",
        "ssl_cafile": tls_files["ssl_cafile"],
        **sasl,
    }
    kwargs = aiokafka_kwargs(kafka, "h:9094")
    assert isinstance(kwargs.pop("ssl_context"), ssl.SSLContext)
    assert kwargs == {"bootstrap_servers": ["h:9094"], "security_protocol": "SASL_SSL", **sasl}

    credentials = faust_broker_kwargs(kafka, "h:9094")["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SASL_SSL"
    assert {k: auth[k] for k in sasl} == sasl
    assert isinstance(auth["ssl_context"], ssl.SSLContext)


def test_unreadable_ssl_files_are_a_config_error(tmp_path: Path) -> None:
    kafka = _settings(
        tmp_path, security_protocol="SSL", ssl_cafile=str(tmp_path / "nope.pem")
    ).kafka
    with pytest.raises(ConfigError, match="cannot load the SSL files"):
        aiokafka_kwargs(kafka, "h:9093")
    with pytest.raises(ConfigError, match=r"nope\.pem"):
        faust_broker_kwargs(kafka, "h:9093")
