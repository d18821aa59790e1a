"""The components' Prometheus metrics (corpusfactory.metrics): values, labels, endpoint.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_metrics_export.py``
"""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corpusfactory import contract
from corpusfactory.contract import Decision
from corpusfactory.errors import ConfigError
from corpusfactory.metrics import (
    AdmitterMetrics,
    BuilderMetrics,
    ComponentMetrics,
    EvaluatorMetrics,
    ProducerMetrics,
    TrainerMetrics,
    WriterMetrics,
    metrics_endpoint,
    serve_metrics,
)
from corpusfactory.settings import load_settings


def samples(metrics: ComponentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def decision(
    turn: str,
    reason: str,
    *,
    nll: float = 1.0,
    tokens: int = 5,
    neighbour: str = "seed:1",
    sim: float = 0.5,
    replayed: bool = False,
    source: str = "selfchat",
    judge: float | None = None,
) -> Decision:
    return Decision(
        schema_version=contract.SCHEMA_VERSION,
        turn_id=turn,
        conversation_id="c",
        index=0,
        accepted=reason == "accepted",
        reason=reason,
        neighbour_id=neighbour,
        similarity=sim,
        nll=nll,
        tokens=tokens,
        embedder="e",
        scorer="s",
        similarity_threshold=0.9,
        nll_threshold=2.0,
        replayed=replayed,
        stage_s={"admit": 0.002},
        judge_score=judge,
        source=source,
    )


def test_every_reason_is_exported_at_zero_from_the_start() -> None:
    got = samples(AdmitterMetrics())
    for reason in contract.Reason:
        assert got["corpusfactory_decisions_total", (("reason", reason),)] == 0.0
    info = ("corpusfactory_component_info", (("component", "admitter"), ("version", "0.1.0")))
    assert got[info] == 1.0


def test_admitter_counts_first_decisions_and_their_distributions() -> None:
    m = AdmitterMetrics(acceptance_window=4)
    m.observe(
        [
            decision("a", "accepted", nll=0.6, sim=0.3),
            decision("b", "duplicate", nll=1.6, sim=0.95),
            decision("c", "low_quality", nll=3.0, source="fauno"),
            decision("a", "accepted", replayed=True),  # a replay: not a new decision
            decision("d", "empty", nll=-1.0, tokens=0, neighbour="", sim=0.0),
            decision("e", "accepted", nll=1.2, judge=4.0),
        ]
    )
    got = samples(m)

    def dec(reason: str) -> float:
        return got["corpusfactory_decisions_total", (("reason", reason),)]

    assert (dec("accepted"), dec("duplicate"), dec("low_quality"), dec("empty")) == (2, 1, 1, 1)
    assert got["corpusfactory_decisions_replayed_total", ()] == 1
    # The window holds the last 4 first decisions: duplicate, low_quality, empty, accepted.
    assert got["corpusfactory_acceptance_rate", ()] == pytest.approx(0.25)
    nll_count = {
        labels: v for (name, labels), v in got.items() if name == "corpusfactory_nll_count"
    }
    assert nll_count == {
        (("accepted", "true"), ("source", "selfchat")): 2,  # a and e (d was never scored)
        (("accepted", "false"), ("source", "selfchat")): 1,
        (("accepted", "false"), ("source", "fauno")): 1,
    }
    sel = (("accepted", "true"), ("source", "selfchat"))
    assert got["corpusfactory_nll_sum", sel] == pytest.approx(1.8)
    assert got["corpusfactory_nll_bucket", (*sel[:1], ("le", "1.0"), *sel[1:])] == 1
    assert got["corpusfactory_neighbour_cosine_count", ()] == 4  # d had no neighbour
    assert got["corpusfactory_neighbour_cosine_bucket", (("le", "0.9"),)] == 3
    assert got["corpusfactory_judge_score_count", ()] == 1
    assert got["corpusfactory_batch_size_count", (("stage", "admit"),)] == 1
    assert got["corpusfactory_stage_seconds_count", (("stage", "admit"),)] == 6


def test_producer_series_exist_from_the_start() -> None:
    m = ProducerMetrics()
    m.start("p1", "demo-gen")
    got = samples(m)
    key = (("model", "demo-gen"), ("producer", "p1"))
    assert got["corpusfactory_candidates_generated_total", key] == 0
    assert (
        got["corpusfactory_conversations_total", (("producer", "p1"), ("status", "truncated"))] == 0
    )
    assert got["corpusfactory_conversations_active", (("producer", "p1"),)] == 0


def test_writer_trainer_evaluator_builder_figures() -> None:
    w = WriterMetrics()
    w.set_counts({("selfchat", False): 3, ("fauno", True): 1}, messages=17, decisions=40)
    got = samples(w)
    assert (
        got["corpusfactory_corpus_conversations", (("source", "fauno"), ("truncated", "true"))] == 1
    )
    assert got["corpusfactory_corpus_messages", ()] == 17

    t = TrainerMetrics()
    t.observe_snapshot(
        {
            "id": "s-0001",
            "first_loss": 5.5,
            "final_loss": 4.25,
            "tokens_per_s": 812.0,
            "conversations": 9,
        }
    )
    got = samples(t)
    assert got["corpusfactory_snapshot_loss", (("point", "final"), ("snapshot", "s-0001"))] == 4.25
    assert got["corpusfactory_snapshot_tokens_per_second", (("snapshot", "s-0001"),)] == 812.0

    e = EvaluatorMetrics()
    e.observe("s-0001", {"squad_it": {"f1": 12.5, "em": 3.0, "n": 8, "predictions": "p.jsonl"}})
    e.observe("base", {"heldout": {"perplexity": float("nan"), "ok": True}}, counted=False)
    got = samples(e)
    assert (
        got[
            "corpusfactory_evaluation_score",
            (("metric", "f1"), ("model", "s-0001"), ("task", "squad_it")),
        ]
        == 12.5
    )
    assert not any(
        k[0] == "corpusfactory_evaluation_score" and ("model", "base") in k[1] for k in got
    )
    assert got["corpusfactory_evaluations_total", ()] == 1  # the stored one is not counted

    b = BuilderMetrics()
    gate = {"kl_mean": 0.01, "kl_p99": 0.2, "top1_agreement": 0.97, "ppl_delta_pct": 1.5}
    b.observe_build(
        {
            "snapshot": "s-0001",
            "quant": "Q4_K_M",
            "gate": gate,
            "published": False,
            "size_bytes": 1000,
        }
    )
    got = samples(b)
    assert (
        got["corpusfactory_build_gate_passed", (("quant", "Q4_K_M"), ("snapshot", "s-0001"))] == 0
    )
    assert (
        got[
            "corpusfactory_build_gate",
            (("figure", "top1_agreement"), ("quant", "Q4_K_M"), ("snapshot", "s-0001")),
        ]
        == 0.97
    )
    assert got["corpusfactory_builds_total", (("result", "held_back"),)] == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(**metrics: Any) -> Any:
    return load_settings(None, environ={}, overrides={"metrics": metrics})


def test_endpoint_serves_the_component_registry_and_closes() -> None:
    port = free_port()
    m = AdmitterMetrics()
    m.observe([decision("a", "accepted")])
    with metrics_endpoint(_settings(), "admitter", m, port) as server:
        assert server is not None and server.port == port
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'corpusfactory_decisions_total{reason="accepted"} 1.0' in body
        assert "corpusfactory_candidates_generated_total" not in body  # not the producer's
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_disabled_or_port_zero_serves_nothing() -> None:
    m = WriterMetrics()
    assert serve_metrics(_settings(enabled=False), "writer", m) is None
    assert serve_metrics(_settings(), "writer", m, port=0) is None
    with pytest.raises(ValueError, match="unknown component"):
        serve_metrics(_settings(), "nobody", m)


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=r"--metrics-port or metrics\.ports\.scorer"):
            serve_metrics(_settings(), "scorer", AdmitterMetrics(), port=port)


def test_writer_counts_follow_the_store_and_survive_a_reopen(tmp_path: Any) -> None:
    from consumers.store import CorpusStore
    from tests.unit.test_store import conv
    from tests.unit.test_store import decision as stored_decision

    with CorpusStore(tmp_path) as store:
        store.write_batch(
            [conv("a", 2), conv("b", 3, truncated=True), conv("c", 4, source="fauno")],
            [stored_decision("t1", True, "accepted", 1.0)],
        )
        store.write_batch([conv("a", 2)])  # already stored: not counted again
        live = store.counts()
    with CorpusStore(tmp_path, read_only=True) as reopened:
        assert reopened.counts() == live
    w = WriterMetrics()
    w.set_counts(*live)
    got = samples(w)
    conversations = {
        labels: v
        for (name, labels), v in got.items()
        if name == "corpusfactory_corpus_conversations"
    }
    assert conversations == {
        (("source", "selfchat"), ("truncated", "false")): 1,
        (("source", "selfchat"), ("truncated", "true")): 1,
        (("source", "fauno"), ("truncated", "false")): 1,
    }
    assert got["corpusfactory_corpus_messages", ()] == 9
    assert got["corpusfactory_corpus_decisions", ()] == 1
