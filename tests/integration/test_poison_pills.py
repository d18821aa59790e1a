"""Fault scenario 10: poison pills in the middle of a batch, and a wedged engine.

Every kind of event that once stopped or corrupted the factory is sent by a
plain Kafka client between valid events, on one partition, so they share the
scorer's and the admitter's batches: each pill lands on the dead-letter topic
with its origin and error, every valid event is decided, the same turn sent
twice gets one first decision and one replay, and both workers keep running.

Then an admitter whose Milvus server cannot be reached: it retries with one
log line a try (no traceback, no password), and still stops on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import uuid
from typing import Any

import pytest

from corpusfactory import contract
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.tools.stack import WorkerProcess
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import (
    DecisionLog,
    Stack,
    candidate,
    producer,
    wait_dead_letters,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(default_stack: Stack) -> Stack:
    """The session's default stack (shared with the pipeline and ingest modules)."""
    return default_stack


def test_poison_pills_mid_batch_are_dead_lettered_and_the_batch_is_decided(stack) -> None:
    s = stack.settings
    topic = s.topic(contract.CANDIDATES)
    conv = f"pill{uuid.uuid4().hex[:6]}"
    key = conv.encode()
    base = json.loads(contract.encode(candidate(conv, 0, "Una frase di base.")))

    def pill(**fields) -> bytes:
        # json.dumps escapes lone surrogates as \udXXX: what a foreign client sends
        return json.dumps({**base, **fields}).encode()

    nested = b"[" * 100_000 + b"]" * 100_000
    pills: dict[str, tuple[bytes, str]] = {
        "oversized_turn_id": (pill(turn_id="x" * 600), "'turn_id' has 600 bytes"),
        "oversized_conversation_id": (
            pill(turn_id=f"{conv}:cid", conversation_id="c" * 300),
            "'conversation_id' has 300 bytes",
        ),
        "oversized_source": (pill(turn_id=f"{conv}:src", source="s" * 100), "'source' has 100"),
        "oversized_text": (pill(turn_id=f"{conv}:txt", text="parola " * 4000), "event limit"),
        "deep_value": (nested, "nested deeper than"),
        "deep_field": (
            pill(turn_id=f"{conv}:deep").replace(
                b'"Una frase di base."', b"[" * 5000 + b"]" * 5000
            ),
            "nested deeper than",
        ),
        "surrogate_turn_id": (pill(turn_id=f"{conv}:\ud800"), "lone surrogate"),
        "surrogate_text": (pill(turn_id=f"{conv}:sur", text="Ciao \udfff!"), "lone surrogate"),
        "surrogate_prompt": (pill(turn_id=f"{conv}:pr", prompt="\ud83d"), "lone surrogate"),
        "invalid_json": (b'{"schema_version": 1, "turn_id": ', "invalid JSON"),
        "empty_value": (b"", "invalid JSON"),
    }
    texts = [
        "Come si prepara un buon risotto ai funghi?",
        "Qual è il periodo migliore per visitare la Sicilia?",
        "Mi consigli un libro di storia romana?",
        "Quanto tempo serve per imparare a suonare la chitarra?",
        "Perché il cielo al tramonto diventa rosso?",
        "Come posso risparmiare energia in casa d'inverno?",
        "Che differenza c'è tra un lago e una laguna?",
        "Quali verdure si seminano in primavera?",
        "Come funziona la raccolta differenziata a Milano?",
        "Dove nasce il fiume Po?",
        "Chi ha dipinto la Primavera agli Uffizi?",
        "Quante ore dorme in media un gatto?",
        "Come si cura una pianta di basilico sul balcone?",
    ]
    conflict = candidate(conv, 90, "La prima versione di questo turno.")
    conflict_b = json.loads(contract.encode(conflict))
    conflict_b["text"] = "Una seconda versione, tutt'altra cosa."
    twice = contract.encode(candidate(conv, 91, "Questo turno arriva due volte di fila."))

    # Sent as one burst (one flush), so that the events share the workers' batches.
    prod = producer(stack.bootstrap)
    futures: dict[str, Any] = {}
    valid: list[str] = []

    def send(name: str, value: bytes) -> None:
        futures[name] = prod.send(topic, key=key, value=value)

    for i, (name, (value, _)) in enumerate(pills.items()):
        good = candidate(conv, 1 + i, texts[i])
        send(f"valid{i}", contract.encode(good))
        valid.append(good.turn_id)
        send(name, value)
        if i == 3:
            send("conflict_a", contract.encode(conflict))
            send("twice_1", twice)
            send("twice_2", twice)
            send("conflict_b", json.dumps(conflict_b).encode())
    last = candidate(conv, 50, texts[-1])
    send("valid_last", contract.encode(last))
    valid.append(last.turn_id)
    prod.flush()
    prod.close()
    sent = {
        name: (f.get(timeout=30).partition, f.get(timeout=30).offset) for name, f in futures.items()
    }
    n_dead = len(pills) + 1  # the pills and the conflicting text
    letters = wait_dead_letters(stack.bootstrap, s, topic, set(sent.values()), n_dead, 180)
    by_origin = {(d.origin_partition, d.origin_offset): d for d in letters}
    assert len(letters) == n_dead, [d.error for d in letters]
    for name, (_, message) in pills.items():
        d = by_origin[sent[name]]
        assert d.origin_topic == topic and d.stage == "decode", name
        assert message in d.error, (name, d.error)
    c = by_origin[sent["conflict_b"]]
    assert (c.origin_topic, c.stage, c.error_type) == (topic, "conflict", "ConflictError")
    assert "already decided for another text" in c.error
    assert json.loads(c.value)["text"] == conflict_b["text"]

    def all_decided() -> dict:
        ds = log.by_turn()
        want = [*valid, conflict.turn_id, f"{conv}:91:0"]
        return ds if all(t in ds for t in want) and len(ds[f"{conv}:91:0"]) >= 2 else {}

    with DecisionLog(stack.bootstrap, s) as log:
        ds = wait_for(all_decided, 180, "decisions for every valid event")
    assert len(ds[conflict.turn_id]) == 1
    copies = ds[f"{conv}:91:0"]
    assert len(copies) == 2 and sorted(d.replayed for d in copies) == [False, True]
    assert len({(d.accepted, d.reason) for d in copies}) == 1
    for turn_id in valid:
        assert len(ds[turn_id]) == 1, turn_id
    assert stack.admitter.alive and stack.scorer.alive
    # none of the pills' ids reached a decision
    assert not [t for t in ds if t.startswith(("xxxx", f"{conv}:src", f"{conv}:sur"))]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_admitter_without_its_index_retries_quietly_and_stops_on_sigterm(
    tmp_path, kafka_bootstrap, built_models
) -> None:
    port = _closed_port()
    s = make_settings(
        tmp_path / "state",
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        milvus={"uri": f"http://admin:hunter2secret@127.0.0.1:{port}", "timeout_s": 1.0},
        admission={"retry_max_s": 1.0},
    )
    ensure_topics(s, kafka_bootstrap)
    admitter = WorkerProcess(s, "admitter").start()
    try:
        wait_for(
            lambda: admitter.log_text().count("vector index unavailable") >= 3,
            180,
            "three failed tries of the index",
        )
        assert admitter.proc is not None
        t0 = time.monotonic()
        admitter.proc.send_signal(signal.SIGTERM)
        code = admitter.proc.wait(timeout=60)
        stopped_s = time.monotonic() - t0
    finally:
        admitter.stop()
    log = admitter.log_text()
    print(f"admitter stopped {stopped_s:.1f}s after SIGTERM (exit {code})")
    assert "hunter2secret" not in log
    assert "Traceback" not in log
    tries = [line for line in log.splitlines() if "vector index unavailable" in line]
    assert len(tries) >= 3 and all(f"127.0.0.1:{port}" in line for line in tries)
    assert "admitter ready" not in log  # nothing was decided without the index
