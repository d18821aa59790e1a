"""The monitoring folder: Prometheus configs and alert rules (checked and unit-tested
by the real promtool), the Grafana dashboards (structure, data source, metric names
against docs/metrics.md, every query run by a real Prometheus), and the helpers of
tests/monitoring_util.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.monitoring_util import (
    ALERTS,
    DASHBOARDS,
    MONITORING,
    PROMTOOL,
    REPO,
    PrometheusServer,
    alert_queries,
    as_data_query,
    dashboard_panels,
    dashboard_queries,
)

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

PROM_DIR = MONITORING / "prometheus"
JOBS = {
    "corpusfactory-scorer": 9401,
    "corpusfactory-admitter": 9402,
    "corpusfactory-producer": 9403,
    "corpusfactory-writer": 9404,
    "corpusfactory-trainer": 9405,
    "corpusfactory-evaluator": 9406,
    "corpusfactory-builder": 9407,
    "corpusfactory-server": 8000,
}
PANEL_TYPES = {"timeseries", "stat", "heatmap", "table", "row"}
METRIC = re.compile(r"corpusfactory_[a-z_]+")


def promtool(*args: str, cwd: Path = PROM_DIR) -> str:
    """Run promtool; fail with its output unless it succeeds."""
    assert PROMTOOL.exists(), f"{PROMTOOL} is missing: `make setup` installs prometheus (apt)"
    proc = subprocess.run(
        [str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


# -- Prometheus ----------------------------------------------------------------------


def test_compose_config_is_valid(tmp_path: Path) -> None:
    # promtool checks that credentials_file exists: give it one beside a copy.
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    server = next(j for j in config["scrape_configs"] if j["job_name"] == "corpusfactory-server")
    assert server["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/etc/prometheus/api_key",
    }
    server["authorization"]["credentials_file"] = str(tmp_path / "api_key")
    (tmp_path / "api_key").write_text("secret\n")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in out


def test_local_config_is_valid() -> None:
    out = promtool("check", "config", "prometheus-local.yml")
    assert "SUCCESS: 1 rule files found" in out


def _jobs(name: str) -> dict[str, dict]:
    config = yaml.safe_load((PROM_DIR / name).read_text())
    assert config["rule_files"] == ["alerts.yml"]
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_compose_config_scrapes_every_component_by_service_name() -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["global"] == {"scrape_interval": "15s", "evaluation_interval": "15s"}
    jobs = _jobs("prometheus.yml")
    assert set(jobs) == set(JOBS)
    # Scaled scorers: one target per replica from the service's A records.
    assert jobs["corpusfactory-scorer"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9401, "refresh_interval": "30s"}
    ]
    for job, port in JOBS.items():
        if job != "corpusfactory-scorer":
            service = job.removeprefix("corpusfactory-")
            assert jobs[job]["static_configs"] == [{"targets": [f"{service}:{port}"]}]


def test_local_config_scrapes_loopback_without_auth() -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus-local.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = _jobs("prometheus-local.yml")
    assert {job: j["static_configs"] for job, j in jobs.items()} == {
        job: [{"targets": [f"127.0.0.1:{port}"]}] for job, port in JOBS.items()
    }
    assert not any("authorization" in j for j in jobs.values())


def test_alert_rules_are_valid() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS: 10 rules found" in out


def test_alert_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_is_unit_tested_and_annotated() -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # shown firing, not only silent
    }
    rules = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in rules] == ["corpusfactory"]
    names = {name for name, _ in alert_queries()}
    assert {
        "AcceptanceRateCollapse",
        "NllDrift",
        "ConsumerLagGrowing",
        "WorkerDown",
        "BuildFailingGate",
        "DeadLetters",
        "TrainingFailed",
        "BuildFailed",
        "EvaluationFailed",
    } <= names
    assert names == tested
    for rule in rules[0]["rules"]:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])


def test_every_alert_is_one_comparison() -> None:
    # The live test's contract: each expr becomes a `bool` query that returns data.
    for name, expr in alert_queries():
        data = as_data_query(expr, alert=True)
        assert " bool " in data, name


# -- Grafana -------------------------------------------------------------------------


def _dashboards() -> dict[str, dict]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert [f.name for f in files] == ["models.json", "overview.json"]
    return {f.name: json.loads(f.read_text(encoding="utf-8")) for f in files}


def test_dashboards_are_well_formed() -> None:
    boards = _dashboards()
    assert boards["overview.json"]["title"] == "corpusfactory — overview"
    assert boards["overview.json"]["uid"] == "corpusfactory-overview"
    assert boards["models.json"]["uid"] == "corpusfactory-models"
    for name, board in boards.items():
        assert board["schemaVersion"] == 39, name
        assert board["templating"]["list"] == [], f"{name}: no template variables"
        panels = dashboard_panels(DASHBOARDS / name)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels:
            where = f"{name}: {panel.get('title')!r}"
            assert panel["type"] in PANEL_TYPES, where
            grid = panel["gridPos"]
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
            if panel["type"] == "row":
                continue
            assert "fieldConfig" in panel, where
            assert panel["datasource"]["uid"] == "prometheus", where
            assert any(t.get("expr") for t in panel["targets"]), f"{where}: no query"
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
            if panel["type"] == "heatmap":
                assert all(t["format"] == "heatmap" for t in panel["targets"]), where


def test_dashboard_rate_windows_use_rate_interval() -> None:
    for board, title, expr in dashboard_queries():
        windows = re.findall(r"\[([^\]]*)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), (board, title, expr)


def test_dashboards_cover_the_brief() -> None:
    exprs = {
        board: " ".join(e for b, _, e in dashboard_queries() if b == board)
        for board in _dashboards()
    }
    for metric in (
        "corpusfactory_acceptance_rate",
        "corpusfactory_decisions_total",
        "corpusfactory_nll_bucket",
        "corpusfactory_neighbour_cosine_bucket",
        "corpusfactory_candidates_generated_total",
        "corpusfactory_consumer_lag",
        "corpusfactory_stage_seconds_bucket",
        "corpusfactory_batch_size_sum",
        "corpusfactory_index_vectors",
        "corpusfactory_corpus_conversations",
        "corpusfactory_conversations_total",
        "corpusfactory_deadletter_total",
    ):
        assert metric in exprs["overview.json"], metric
    for metric in (
        "corpusfactory_snapshots_total",
        "corpusfactory_snapshot_loss",
        "corpusfactory_snapshot_tokens_per_second",
        "corpusfactory_training_pending_conversations",
        "corpusfactory_evaluation_score",
        "corpusfactory_build_gate",
        "corpusfactory_build_gate_passed",
        "corpusfactory_build_size_bytes",
        "corpusfactory_serving_requests_total",
        "corpusfactory_serving_request_duration_seconds_bucket",
        "corpusfactory_serving_generated_tokens_total",
        "corpusfactory_serving_model_info",
    ):
        assert metric in exprs["models.json"], metric


def test_grafana_provisioning() -> None:
    prov = MONITORING / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    (provider,) = yaml.safe_load((prov / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# -- metric names against the contract -----------------------------------------------


def documented_metrics() -> tuple[set[str], set[str]]:
    """(every metric name in docs/metrics.md, those documented as histograms)."""
    names: set[str] = set()
    histograms: set[str] = set()
    for line in (REPO / "docs" / "metrics.md").read_text(encoding="utf-8").splitlines():
        found = set(METRIC.findall(line))
        names |= found
        if "histogram" in line:
            histograms |= found
    return names, histograms


def undocumented(exprs: list[str]) -> set[str]:
    names, histograms = documented_metrics()
    missing: set[str] = set()
    for expr in exprs:
        for name in METRIC.findall(expr):
            # A histogram's series carry suffixes; counters are documented with _total.
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in names and not (base != name and base in histograms):
                missing.add(name)
    return missing


def test_every_metric_used_is_documented() -> None:
    exprs = [e for _, _, e in dashboard_queries()] + [e for _, e in alert_queries()]
    assert len(exprs) > 40
    assert undocumented(exprs) == set()


def test_metric_name_check_catches_mistakes() -> None:
    assert undocumented(["rate(corpusfactory_nll_bucket[5m])"]) == set()
    assert undocumented(["corpusfactory_decisions_total"]) == set()
    assert undocumented(["corpusfactory_decisions"]) == {"corpusfactory_decisions"}
    # _count exists only for histograms; a gauge has none.
    assert undocumented(["corpusfactory_consumer_lag_count"]) == {
        "corpusfactory_consumer_lag_count"
    }
    assert undocumented(["corpusfactory_nl_bucket"]) == {"corpusfactory_nl_bucket"}


# -- as_data_query -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up == 0", "up == bool 0"),
        ("up==0", "up== bool 0"),
        ("a > b", "a > bool b"),
        ("a >= 1.5 * b", "a >= bool 1.5 * b"),
        ("a != 0", "a != bool 0"),
        # Matchers are not comparisons, whatever their characters.
        ('up{job=~"a.*", x!="1", y!~"<>"} < 1', 'up{job=~"a.*", x!="1", y!~"<>"} < bool 1'),
        ('x{a="b==c", d=">="} <= 2', 'x{a="b==c", d=">="} <= bool 2'),
        # Nested comparisons (inside parentheses) stay as they are.
        (
            "deriv(m[10m:]) * (max by (g) (m) > bool 1000) > 0",
            "deriv(m[10m:]) * (max by (g) (m) > bool 1000) > bool 0",
        ),
        ("(a or on() vector(0)) > 0", "(a or on() vector(0)) > bool 0"),
        ('sum(x{s=~"5.."}) / (sum(y) > 0) > 0.05', 'sum(x{s=~"5.."}) / (sum(y) > 0) > bool 0.05'),
        ("a > bool 0", "a > bool 0"),  # already a data query
        ("rate(x[$__rate_interval]) > 0", "rate(x[30s]) > bool 0"),
    ],
)
def test_as_data_query_alerts(expr: str, expected: str) -> None:
    assert as_data_query(expr, alert=True) == expected


def test_as_data_query_windows() -> None:
    expr = "rate(a[$__rate_interval]) + rate(b[$__interval]) + increase(c[${__range}])"
    assert as_data_query(expr) == "rate(a[30s]) + rate(b[30s]) + increase(c[30s])"
    assert as_data_query("rate(a[$__rate_interval])", "2m") == "rate(a[2m])"
    # Not alert queries: comparisons are left alone; other variables too.
    assert as_data_query("up == 0") == "up == 0"
    assert as_data_query("x * $__interval_ms") == "x * $__interval_ms"


@pytest.mark.parametrize(
    "expr",
    [
        "up",  # no comparison
        "rate(x[5m])",
        "(up == 0)",  # only a nested one
        "a > b > c",
        "a > 0 and b > 0",
        "a > 0 unless b",
        "a or b > 0",
        'x{a=">"} > (y',  # unbalanced
        'x{a="}"} > 0 "',  # unclosed string
    ],
)
def test_as_data_query_refuses(expr: str) -> None:
    with pytest.raises(ValueError):
        as_data_query(expr, alert=True)


def test_as_data_query_ignores_comments_and_escapes() -> None:
    assert as_data_query('x{a="\\"<"} # > 1 (\n> 2', alert=True) == 'x{a="\\"<"} # > 1 (\n> bool 2'
    assert as_data_query("m{a='>'} == 1", alert=True) == "m{a='>'} == bool 1"


# -- a real Prometheus ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    """A real Prometheus with no targets, the repo's rules loaded."""
    with PrometheusServer({}, rule_files=[ALERTS]) as server:
        yield server


def test_every_query_runs(prometheus: PrometheusServer) -> None:
    # Prometheus parses and evaluates each one: a syntax or type error is an error.
    for board, title, expr in dashboard_queries():
        try:
            prometheus.query(as_data_query(expr))
        except RuntimeError as exc:
            raise AssertionError(f"{board} {title!r}: {exc}") from None
    for name, expr in alert_queries():
        try:
            prometheus.query(as_data_query(expr, alert=True))
            now = time.time()
            prometheus.query_range(as_data_query(expr, alert=True), now - 60, now, 15)
        except RuntimeError as exc:
            raise AssertionError(f"alert {name}: {exc}") from None


def test_query_errors_are_raised(prometheus: PrometheusServer) -> None:
    with pytest.raises(RuntimeError, match="bad_data"):
        prometheus.query("sum(")
    with pytest.raises(RuntimeError, match="bad_data"):
        prometheus.query_range("up", 10, 0, 1)  # end before start


def test_rules_are_loaded(prometheus: PrometheusServer) -> None:
    (group,) = prometheus.rules()
    assert group["name"] == "corpusfactory"
    assert {r["name"] for r in group["rules"]} == {name for name, _ in alert_queries()}
    assert all(r["health"] != "err" for r in group["rules"])
    assert prometheus.targets() == []


class _Metrics(BaseHTTPRequestHandler):
    token = "s3cret"

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        body = (
            b"corpusfactory_acceptance_rate 0.25\n"
            b'corpusfactory_decisions_total{reason="accepted"} 7\n'
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # keep the test output clean


def test_prometheus_scrapes_a_target() -> None:
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=exporter.serve_forever, daemon=True)
    thread.start()
    address = f"127.0.0.1:{exporter.server_address[1]}"
    try:
        with PrometheusServer(
            {"corpusfactory-admitter": [address]},
            bearer_tokens={"corpusfactory-admitter": _Metrics.token},
        ) as server:
            (target,) = server.wait_until_scraped(timeout=30)
            assert target["labels"] == {"instance": address, "job": "corpusfactory-admitter"}
            (sample,) = server.query("corpusfactory_acceptance_rate")
            assert sample["metric"]["job"] == "corpusfactory-admitter"
            assert float(sample["value"][1]) == 0.25
            data = as_data_query(
                'corpusfactory_decisions_total{reason="accepted"} > 10', alert=True
            )
            (sample,) = server.query(data)
            assert float(sample["value"][1]) == 0.0  # not firing, but data
            now = time.time()
            (series,) = server.query_range("up", now - 5, now, 1)
            assert series["values"][-1][1] == "1"
            # two scrapes after this moment: two raw samples of `up` stamped after it
            moment = time.time()
            server.wait_scraped_after(moment, scrapes=2, timeout=30)
            (raw,) = server.query("up[1m]")
            assert len([t for t, _ in raw["values"] if float(t) >= moment]) >= 2
    finally:
        exporter.shutdown()
        exporter.server_close()


def test_prometheus_server_refuses_other_hosts() -> None:
    with pytest.raises(ValueError, match="loopback"):
        PrometheusServer({"job": ["10.0.0.1:9401"]})
