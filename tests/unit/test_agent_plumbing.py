"""The stream agents' plumbing, driven in-process by faust's agent test harness.

``score_turns`` and ``admit_turns`` are registered by their real ``register``
functions on the real app of their role (``streams.app.create_context``, the
first half of ``create_app``) and run with ``agent.test_context()``: faust feeds
the values put into it, as Kafka messages with offsets, through an in-memory
channel to the agent's unchanged body (``stream.take_events`` batching, the
inference thread, the models, Milvus Lite). No broker is started.

What is swapped, and why:

* The role's output topics (scorer: ``turns.scored``, admitter:
  ``turns.decisions``; both: ``turns.deadletter``) are replaced by in-memory
  ``app.channel()`` channels before the agent is registered; the input topic
  stays, so the harness's messages carry its real name as their origin. A
  ``Topic.send`` needs a running producer and broker; a channel has the same
  ``send`` interface and hands the encoded bytes to a subscriber in this
  process, so each test reads exactly what the agent would have produced.
  Nothing else is faked: the scorer loads the real demo scorer and the packaged
  MiniLM embedder, the admitter writes a real Milvus Lite index (8-dimensional
  hand-made embeddings: the point is the plumbing).
* ``put(..., wait=False)``: the agent does not yield, and faust's harness
  records a value when the stream hands it on, before the batch is processed;
  the tests wait for the outputs themselves instead, with a deadline.

The admitter tests hand ``admit.register`` an ``Admitter`` they own, so they can
read its index afterwards and close it.

Covered: an event that does not decode is dead-lettered with its origin and the
agent goes on with the rest of its batch and with later batches (both agents);
a batch the admitter cannot write as a whole (one turn with a NaN embedding,
which the index refuses) is decided turn by turn, so only that turn is
dead-lettered; an unavailable index (a Milvus server not listening yet) is
retried with back-off, nothing decided or dead-lettered meanwhile, and the turn
is decided once when the server comes up (a Milvus Lite gRPC server started on
the configured port mid-test). The scorer's own turn-by-turn fallback is not
driven here: no valid candidate makes the real models fail on one text alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from corpusfactory import contract
from corpusfactory.engines.index import KIND_TURN
from corpusfactory.metrics import AdmitterMetrics, ScorerMetrics
from corpusfactory.settings import Settings, load_settings
from streams import admit, score
from streams.app import StreamContext, create_context

# Loads models and opens Milvus Lite: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

DIM = 8
OUTPUTS = {"scorer": ("scored", "deadletter"), "admitter": ("decisions", "deadletter")}
WAIT_S = 60.0  # generous: the models load on a busy 2-core machine


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(
        None,
        environ={},
        overrides={"state_dir": str(tmp_path), "index": {"seed_on_start": False}, **overrides},
    )


@dataclass
class Wired:
    """A role's context with its outputs on in-memory channels, and their readers."""

    ctx: StreamContext
    agent: Any
    outputs: dict[str, Any]  # output name -> a subscribed clone of its channel

    async def take(self, name: str, n: int, timeout: float = WAIT_S) -> list[bytes]:
        """The next ``n`` values sent to output ``name`` (fails after ``timeout``)."""
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.outputs[name].get(), max(left, 0.01))
            except TimeoutError:
                pytest.fail(f"{name}: {len(out)} of {n} values after {timeout:.0f}s")
            out.append(event.value)
        return out

    def pending(self, name: str) -> int:
        return self.outputs[name].queue.qsize()  # type: ignore[no-any-return]


def wire(
    settings: Settings, role: str, register: Callable[[StreamContext], None], agent: str
) -> tuple[StreamContext, Any]:
    metrics = ScorerMetrics() if role == "scorer" else AdmitterMetrics()
    # No broker behind this address: nothing here connects to it.
    ctx = create_context(settings, role, "127.0.0.1:9", metrics)
    # The role's output topics become in-memory channels; its input topic stays (the
    # harness reads its name for the messages' origin and feeds a channel of its own).
    for name in OUTPUTS[role]:
        setattr(ctx, name, ctx.app.channel())
    register(ctx)
    return ctx, ctx.app.agents[agent]


async def drive(
    ctx: StreamContext, agent: Any, body: Callable[[Any, Wired], Awaitable[None]]
) -> None:
    """Run ``body(agent_ctx, wired)`` inside the agent's test context."""
    harness = agent.test_context()  # resumes flow control: subscribe after this
    role = "scorer" if agent.name == "score_turns" else "admitter"
    outputs = {name: getattr(ctx, name).clone(is_iterator=True) for name in OUTPUTS[role]}
    wired = Wired(ctx, agent, outputs)
    async with harness as agent_ctx:
        await body(agent_ctx, wired)


def candidate(turn_id: str, text: str) -> contract.CandidateTurn:
    conv = turn_id.split(":")[0]
    return contract.CandidateTurn(
        schema_version=contract.SCHEMA_VERSION,
        turn_id=turn_id,
        conversation_id=conv,
        index=0,
        role="user",
        text=text,
    )


def scored(turn_id: str, axis: int, origin_offset: int, nll: float = 1.0) -> contract.ScoredTurn:
    vec = [0.0] * DIM
    vec[axis] = 1.0
    return contract.ScoredTurn(
        schema_version=contract.SCHEMA_VERSION,
        candidate=candidate(turn_id, f"Il testo del turno {turn_id}."),
        precheck="",
        embedding=vec,
        nll=nll,
        tokens=5,
        embedder="unit",
        scorer="unit",
        nll_threshold=2.0,
        origin_partition=0,
        origin_offset=origin_offset,
    )


def counter(metrics: Any, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"corpusfactory_{name}_total", labels)
    return float(value or 0.0)


@pytest.fixture
def executors() -> Iterator[list[StreamContext]]:
    """Contexts whose inference thread is shut down after the test."""
    made: list[StreamContext] = []
    yield made
    for ctx in made:
        ctx.executor.shutdown(wait=True)


# ----------------------------------------------------------------------------- scorer


def test_scorer_dead_letters_an_undecodable_candidate_and_scores_the_rest(
    tmp_path: Path, executors: list[StreamContext]
) -> None:
    settings = make_settings(tmp_path)
    ctx, agent = wire(settings, "scorer", score.register, "score_turns")
    executors.append(ctx)
    good = [
        candidate("c1:0:0", "Il pane si fa con farina, acqua e lievito."),
        candidate("c2:0:0", "Domani andiamo al mare con gli amici."),
    ]

    async def body(agent_ctx: Any, w: Wired) -> None:
        await agent_ctx.put(contract.encode(good[0]), key=b"c1", wait=False)  # offset 0
        await agent_ctx.put(b'{"schema_version": 1, "turn_id": ', key=b"bad", wait=False)  # 1
        await agent_ctx.put(contract.encode(good[1]), key=b"c2", wait=False)  # offset 2
        dead = [json.loads(v) for v in await w.take("deadletter", 1)]
        out = [contract.decode_scored(v) for v in await w.take("scored", 2)]
        assert dead[0]["stage"] == "decode"
        assert dead[0]["origin_topic"] == settings.topic(contract.CANDIDATES)
        assert (dead[0]["origin_partition"], dead[0]["origin_offset"]) == (0, 1)
        assert dead[0]["key"] == "bad" and dead[0]["value"].startswith('{"schema_version"')
        assert dead[0]["error_type"] == "ContractError" and "invalid JSON" in dead[0]["error"]
        assert [(s.candidate.turn_id, s.origin_offset) for s in out] == [
            ("c1:0:0", 0),
            ("c2:0:0", 2),
        ]
        for s in out:  # really scored and embedded by the models
            assert s.precheck == "" and math.isfinite(s.nll) and s.nll > 0 and s.tokens > 0
            assert len(s.embedding) == 384
            assert abs(float(np.linalg.norm(s.embedding)) - 1.0) < 1e-3
        # The agent is still running: a later candidate is scored too.
        later = candidate("c3:0:0", "Il gatto dorme sul divano.")
        await agent_ctx.put(contract.encode(later), key=b"c3", wait=False)  # offset 3
        (last,) = [contract.decode_scored(v) for v in await w.take("scored", 1)]
        assert (last.candidate.turn_id, last.origin_offset) == ("c3:0:0", 3)
        assert w.pending("deadletter") == 0
        assert counter(ctx.metrics, "deadletter", stage="decode") == 1.0
        assert counter(ctx.metrics, "deadletter", stage="score") == 0.0

    asyncio.run(drive(ctx, agent, body))


# --------------------------------------------------------------------------- admitter


@pytest.fixture
def admitter_of(tmp_path: Path) -> Iterator[Callable[[Settings], admit.Admitter]]:
    """Admitters whose index is closed after the test."""
    made: list[admit.Admitter] = []

    def make(settings: Settings) -> admit.Admitter:
        a = admit.Admitter(settings)
        made.append(a)
        return a

    yield make
    for a in made:
        if a.index is not None:
            a.index.close()


def wire_admitter(
    settings: Settings, admitter: admit.Admitter, executors: list[StreamContext]
) -> tuple[StreamContext, Any]:
    ctx, agent = wire(settings, "admitter", lambda c: admit.register(c, admitter), "admit_turns")
    executors.append(ctx)
    return ctx, agent


def test_admitter_dead_letters_an_undecodable_scored_turn_and_decides_the_rest(
    tmp_path: Path, executors: list[StreamContext], admitter_of: Any
) -> None:
    settings = make_settings(tmp_path)
    admitter = admitter_of(settings)
    ctx, agent = wire_admitter(settings, admitter, executors)

    async def body(agent_ctx: Any, w: Wired) -> None:
        await agent_ctx.put(contract.encode(scored("a:0:0", 0, 10)), key=b"a", wait=False)
        await agent_ctx.put(b"\xff\xfe not utf-8", key=b"x", wait=False)  # offset 1
        await agent_ctx.put(contract.encode(scored("b:0:0", 1, 12)), key=b"b", wait=False)
        dead = [json.loads(v) for v in await w.take("deadletter", 1)]
        out = [contract.decode_decision(v) for v in await w.take("decisions", 2)]
        # A scored event that does not decode points at itself (its candidate is unknown).
        assert dead[0]["stage"] == "admit"
        assert dead[0]["origin_topic"] == settings.topic(contract.SCORED)
        assert dead[0]["origin_offset"] == 1 and dead[0]["key"] == "x"
        assert dead[0]["error_type"] == "ContractError" and "not UTF-8" in dead[0]["error"]
        assert [(d.turn_id, d.accepted, d.reason, d.replayed) for d in out] == [
            ("a:0:0", True, "accepted", False),
            ("b:0:0", True, "accepted", False),
        ]
        # Still running: a later batch is decided (a near-copy of a: a duplicate).
        await agent_ctx.put(contract.encode(scored("c:0:0", 0, 13)), key=b"c", wait=False)
        (last,) = [contract.decode_decision(v) for v in await w.take("decisions", 1)]
        assert (last.turn_id, last.accepted, last.reason, last.neighbour_id) == (
            "c:0:0",
            False,
            "duplicate",
            "a:0:0",
        )
        assert w.pending("deadletter") == 0
        assert counter(ctx.metrics, "deadletter", stage="admit") == 1.0

    asyncio.run(drive(ctx, agent, body))
    assert admitter.index is not None
    assert sorted(admitter.index.refs(KIND_TURN)) == ["a:0:0", "b:0:0"]


def test_a_batch_the_index_refuses_is_decided_turn_by_turn(
    tmp_path: Path,
    executors: list[StreamContext],
    admitter_of: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(tmp_path)
    admitter = admitter_of(settings)
    ctx, agent = wire_admitter(settings, admitter, executors)
    # The contract checks an embedding's type, not its values: JSON's NaN passes, and
    # the index refuses the batch's upsert as a whole (non-finite vectors).
    bad = scored("n:0:0", 2, 21)
    bad.embedding = [math.nan] * DIM
    batch = [scored("a:0:0", 0, 20), bad, scored("b:0:0", 1, 22)]

    async def body(agent_ctx: Any, w: Wired) -> None:
        for s in batch:  # put at once: one take_events batch
            await agent_ctx.put(contract.encode(s), key=s.candidate.turn_id.encode(), wait=False)
        out = [contract.decode_decision(v) for v in await w.take("decisions", 2)]
        dead = [json.loads(v) for v in await w.take("deadletter", 1)]
        assert [(d.turn_id, d.accepted, d.reason, d.replayed) for d in out] == [
            ("a:0:0", True, "accepted", False),
            ("b:0:0", True, "accepted", False),
        ]
        # The dead letter points at the candidate the producer sent.
        assert dead[0]["stage"] == "admit" and dead[0]["error_type"] == "IndexRecordError"
        assert "finite: False" in dead[0]["error"]
        assert dead[0]["origin_topic"] == settings.topic(contract.CANDIDATES)
        assert (dead[0]["origin_partition"], dead[0]["origin_offset"]) == (0, 21)
        assert json.loads(dead[0]["value"])["turn_id"] == "n:0:0"
        assert w.pending("decisions") == 0 and w.pending("deadletter") == 0

    with caplog.at_level(logging.ERROR, logger="streams.admit"):
        asyncio.run(drive(ctx, agent, body))
    fallbacks = [r for r in caplog.records if "deciding turn by turn" in r.getMessage()]
    assert len(fallbacks) == 1, "the three turns were meant to fail as one batch"
    assert "IndexRecordError" in fallbacks[0].getMessage()
    # Nothing of the refused turn was written; the others once each.
    assert admitter.index is not None
    assert sorted(admitter.index.refs(KIND_TURN)) == ["a:0:0", "b:0:0"]
    assert admitter.index.prior_decisions(["n:0:0"]) == {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unavailable_index_is_retried_not_dead_lettered(
    tmp_path: Path,
    executors: list[StreamContext],
    admitter_of: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    port = free_port()
    settings = make_settings(
        tmp_path,
        milvus={"uri": f"http://127.0.0.1:{port}", "timeout_s": 1.0},
        admission={"retry_max_s": 0.5},
    )
    admitter = admitter_of(settings)
    ctx, agent = wire_admitter(settings, admitter, executors)
    servers: list[Any] = []

    async def body(agent_ctx: Any, w: Wired) -> None:
        await agent_ctx.put(contract.encode(scored("a:0:0", 0, 30)), key=b"a", wait=False)
        # No Milvus listens yet: the batch is retried, nothing decided or dead-lettered.
        deadline = time.monotonic() + WAIT_S
        while counter(ctx.metrics, "index_retries") < 2:
            assert time.monotonic() < deadline, "the admitter never retried the index"
            await asyncio.sleep(0.1)
        assert w.pending("decisions") == 0 and w.pending("deadletter") == 0
        assert admitter.index is None
        # The server comes up: the next try opens the index and decides the turn once.
        servers.append(start_server_in_thread(str(tmp_path / "served"), port=port))
        (d,) = [contract.decode_decision(v) for v in await w.take("decisions", 1)]
        assert (d.turn_id, d.accepted, d.reason, d.replayed) == ("a:0:0", True, "accepted", False)
        assert w.pending("deadletter") == 0
        assert counter(ctx.metrics, "deadletter", stage="admit") == 0.0

    try:
        with caplog.at_level(logging.INFO, logger="streams.admit"):
            asyncio.run(drive(ctx, agent, body))
        assert admitter.index is not None
        assert admitter.index.refs(KIND_TURN) == ["a:0:0"]
    finally:
        if admitter.index is not None:
            admitter.index.close()
            admitter.index = None
        for server, db, _ in servers:
            server.stop(grace=0)
            db.close()
    tries = [r.getMessage() for r in caplog.records if "vector index unavailable" in r.getMessage()]
    assert len(tries) >= 2 and all(m.startswith("admission:") for m in tries)
    assert any("vector index back after" in r.getMessage() for r in caplog.records)
