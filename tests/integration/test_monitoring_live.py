"""The whole factory scraped by a real Prometheus: every dashboard and alert query has data.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_monitoring_live.py``

One short live run of every long-running component as its own process (scorer,
admitter, producer, corpus writer, trainer, evaluator, builder, server), each
serving /metrics on a free port, scraped every second by Debian's Prometheus with
the project's alert rules loaded. The run: the self-chat producer writes a few
conversations, a team fixture is ingested (source ``fauno``), seed conversations
are published so the trainer's trigger fires; the snapshot is evaluated, built
(F16, Q8_0, Q4_K_M), gated and served, and the server answers chat requests.
Then every PromQL expression of the Grafana dashboards and of the alert rules is
run over the run's time range and must return data, and ``corpusfactory report``
is rendered from the run's state with data in every plot.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from corpusfactory.cli.main import main
from corpusfactory.metrics import COMPONENTS
from corpusfactory.settings import Settings
from corpusfactory.tools.report.build import build_report
from corpusfactory.tools.stack import (
    ProducerProcess,
    ServiceProcess,
    WorkerProcess,
    stop_all,
    write_settings,
)
from serving.builds import BuildStore
from tests.integration.pipeline_util import wait_for
from tests.integration.trainer_util import publish, seed_conversations, trainer_settings
from tests.monitoring_util import (
    ALERTS,
    PrometheusServer,
    alert_queries,
    as_data_query,
    dashboard_queries,
)
from training.snapshots import SnapshotStore

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WINDOW = "15s"  # rate windows of the queries: 15 scrapes at 1 s
STEP_S = 2  # the step of the range queries over the run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveRun:
    settings: Settings
    prometheus: PrometheusServer
    started: float
    ended: float
    chat_answers: list[str]


def _settings(tmp_path: Path, bootstrap: str, prefix: str) -> tuple[Settings, dict[str, int]]:
    ports = {c: free_port() for c in COMPONENTS}
    settings = trainer_settings(
        tmp_path,
        bootstrap,
        prefix,
        evaluation={
            "tasks": ["squad_it", "heldout", "generation_nll"],
            "squad_it_path": str(FIXTURES / "squad_it_small.json"),
            "squad_it_limit": 4,
            "generation_prompts": 2,
            "generation_max_new_tokens": 16,
        },
        max_steps=2,
        heldout_percent=20,
        trigger={"every_conversations": 6},
    )
    # A fixed NLL threshold (about the demo scorer's p95 on the seeds): the scorer then
    # starts without scoring every seed message, a minute on 2 busy cores.
    settings.admission.nll_threshold_percentile = None
    settings.admission.nll_threshold = 6.5
    settings.metrics.enabled = True
    settings.metrics.lag_cache_s = 1.0
    for component, port in ports.items():
        setattr(settings.metrics.ports, component, port)
    settings.serving.port = free_port()
    settings.serving.gate_texts = 4
    settings.serving.max_tokens = 12
    settings.producer.conversations = 3
    settings.producer.in_flight = 3
    return settings, ports


@pytest.fixture(scope="module")
def live(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory, built_models: Any
) -> Iterator[LiveRun]:
    tmp_path = tmp_path_factory.mktemp("monitoring")
    prefix = f"mon{time.time_ns() % 10**8}."
    settings, ports = _settings(tmp_path, kafka_bootstrap, prefix)
    targets = {f"corpusfactory-{c}": [f"127.0.0.1:{p}"] for c, p in ports.items()}
    targets["corpusfactory-server"] = [f"127.0.0.1:{settings.serving.port}"]
    with ExitStack() as stack:
        prometheus = stack.enter_context(PrometheusServer(targets, rule_files=[ALERTS]))
        started = time.time()
        services = [
            WorkerProcess(settings, "admitter"),
            WorkerProcess(settings, "scorer"),
            ServiceProcess(settings, ["corpus", "write"], "writer", "corpus writer: group"),
            ServiceProcess(settings, ["train"], "trainer", "trainer ready"),
            ServiceProcess(settings, ["evaluate"], "evaluator", "evaluator ready"),
            ServiceProcess(settings, ["build"], "builder", "builder ready"),
            ServiceProcess(
                settings, ["serve", "--backend", "gguf"], "server", "Uvicorn running on"
            ),
        ]
        stack.callback(stop_all, services)
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(300)
        producer = ProducerProcess(settings, settings.producer.conversations).start()
        stack.callback(producer.stop)
        prometheus.wait_until_scraped(120)

        # Ingested conversations, through the same scoring and admission.
        config = write_settings(settings, tmp_path / "ingest.yaml")
        out = io.StringIO()
        fauno = FIXTURES / "ingest" / "fauno.json"
        with redirect_stdout(out):
            argv = ["ingest", str(fauno), "--format", "fauno", "--json", "--config", str(config)]
            assert main(argv) == 0
        assert json.loads(out.getvalue())["publish"]["accepted"] > 0
        # Enough accepted conversations for the trainer's trigger, whatever the tiny
        # generator managed: seed conversations published as accepted.
        publish(kafka_bootstrap, settings, seed_conversations(0, 10, "mon"))
        assert producer.wait(600) == 0, producer.log_text()[-3000:]

        snapshots = SnapshotStore(settings.snapshots_path)
        snap = wait_for(lambda: (snapshots.all() or [None])[-1], 600, "a snapshot")
        builds = BuildStore(settings.builds_path)
        wait_for(
            lambda: {"F16", "Q8_0", "Q4_K_M"} <= set(builds.for_snapshot(snap.id)),
            600,
            "the snapshot's builds",
        )
        wait_for(lambda: "generation_nll" in snapshots.evaluations(snap.id), 600, "its evaluation")
        base_url = f"http://127.0.0.1:{settings.serving.port}"

        def serving_model() -> bool:
            models = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"]
            return any(m["id"].startswith(snap.id) for m in models)

        wait_for(serving_model, 120, "the server to follow the new build")
        answers = []
        for question in ("Ciao! Come stai?", "Mi consigli un libro?"):
            reply = httpx.post(
                f"{base_url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": question}], "max_tokens": 8},
                timeout=120,
            )
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
        # The queries below step by STEP_S over the run: the run ends once every series
        # that began by now (sampled at most one scrape later) is under a step point.
        prometheus.wait_scraped_after(time.time(), scrapes=STEP_S + 2)
        yield LiveRun(settings, prometheus, started, time.time(), answers)


def _has_data(run: LiveRun, expr: str) -> bool:
    result = run.prometheus.query_range(expr, run.started, run.ended, STEP_S)
    return any(series["values"] for series in result)


def test_every_component_is_scraped(live: LiveRun) -> None:
    up = live.prometheus.query_range("up", live.started, live.ended, STEP_S)
    jobs = {s["metric"]["job"] for s in up if any(v[1] == "1" for v in s["values"])}
    assert jobs == {f"corpusfactory-{c}" for c in (*COMPONENTS, "server")}
    # The producer exits once its conversations are done: over the run, not at its end.
    info = live.prometheus.query_range(
        "corpusfactory_component_info", live.started, live.ended, STEP_S
    )
    assert {s["metric"]["component"] for s in info} == set(COMPONENTS)


def test_every_dashboard_query_returns_data(live: LiveRun) -> None:
    queries = dashboard_queries()
    assert len(queries) > 30
    empty = [
        (board, panel, expr)
        for board, panel, expr in queries
        if not _has_data(live, as_data_query(expr, WINDOW))
    ]
    assert not empty, f"{len(empty)} dashboard queries without data: {empty}"


def test_every_alert_expression_returns_data(live: LiveRun) -> None:
    queries = alert_queries()
    assert len(queries) >= 5
    empty = [
        (alert, expr)
        for alert, expr in queries
        if not _has_data(live, as_data_query(expr, WINDOW, alert=True))
    ]
    assert not empty, f"alert expressions without data: {empty}"
    groups = live.prometheus.rules()
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert loaded == {name for name, _ in queries}
    assert all(r["health"] == "ok" for g in groups for r in g["rules"])


def test_the_figures_match_the_run(live: LiveRun) -> None:
    p = live.prometheus
    at = live.ended
    decided = p.query("sum(corpusfactory_decisions_total)", at)
    assert decided and float(decided[0]["value"][1]) > 0
    sources = {s["metric"]["source"] for s in p.query("corpusfactory_nll_count", at)}
    assert {"selfchat", "fauno"} <= sources
    passed = p.query("corpusfactory_build_gate_passed", at)
    assert {s["metric"]["quant"] for s in passed} == {"F16", "Q8_0", "Q4_K_M"}
    served = p.query('sum(corpusfactory_serving_requests_total{route="/v1/chat/completions"})', at)
    assert float(served[0]["value"][1]) >= len(live.chat_answers)
    f1 = p.query('corpusfactory_evaluation_score{task="squad_it",metric="f1"}', at)
    assert {s["metric"]["model"] for s in f1} >= {"base"}
    corpus = p.query("sum(corpusfactory_corpus_conversations)", at)
    assert float(corpus[0]["value"][1]) >= 10  # the seed conversations at least


def test_the_report_renders_from_the_run_with_data_in_every_plot(
    live: LiveRun, tmp_path: Path
) -> None:
    result = build_report(live.settings, tmp_path / "report")
    assert not result.missing, result.missing
    assert {f.name for f in result.figures} == {
        "nll_by_corpus",
        "acceptance_over_time",
        "cosine_hist",
        "evaluation",
    }
    for fig in result.figures:
        assert sum(fig.series.values()) > 0, fig
        assert (result.out_dir / fig.file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nll = result.figure("nll_by_corpus").series
    assert all(nll.get(k, 0) > 0 for k in ("seeds", "generated", "accepted", "ingested")), nll
    assert result.html.is_file()
