"""Helpers of the monitoring tests: the queries of the dashboards and alert rules, and a
real Prometheus server (Debian's /usr/bin/prometheus) to run them against.

* ``dashboard_queries`` / ``alert_queries``: every PromQL expression of
  monitoring/grafana/dashboards/*.json and monitoring/prometheus/alerts.yml.
* ``as_data_query``: turns a dashboard or alert expression into one that returns
  data whenever its inputs exist (Grafana's ``$__*`` windows replaced; an alert's
  single top-level comparison made a ``bool`` one, so "not firing" is a 0, not an
  empty result).
* ``PrometheusServer``: a throw-away Prometheus scraping loopback targets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")


# -- the queries ---------------------------------------------------------------------


def _panels(panels: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    # A collapsed row keeps its panels inside itself; an open row is followed by them.
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels(path: Path) -> list[dict[str, Any]]:
    """Every panel of one dashboard file, rows' nested panels included."""
    return list(_panels(json.loads(path.read_text(encoding="utf-8")).get("panels", [])))


def dashboard_queries(path: Path | None = None) -> list[tuple[str, str, str]]:
    """(dashboard file name, panel title, expr) of every target of every panel.

    ``path`` is one dashboard file or a folder of them (default: the repo's dashboards).
    """
    root = DASHBOARDS if path is None else Path(path)
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    out: list[tuple[str, str, str]] = []
    for file in files:
        for panel in dashboard_panels(file):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((file.name, panel.get("title", ""), target["expr"]))
    return out


def alert_queries(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(alert name, expr) of every alerting rule (recording rules are left out)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        (rule["alert"], rule["expr"])
        for group in doc.get("groups", [])
        for rule in group.get("rules", [])
        if "alert" in rule
    ]


# -- as_data_query -------------------------------------------------------------------

# Grafana's built-in range variables, bare or braced; not $__interval_ms and kin.
_GRAFANA_WINDOW = re.compile(
    r"\$(?:__(?:rate_interval|interval|range)(?![A-Za-z0-9_])"
    r"|\{__(?:rate_interval|interval|range)\})"
)
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPERATORS = re.compile(r"(?<![A-Za-z0-9_:])(and|or|unless)(?![A-Za-z0-9_:])")
_OPEN = {"(": ")", "[": "]", "{": "}"}


def _top_level(expr: str) -> list[tuple[int, str]]:
    """(offset, text) of the stretches of ``expr`` outside brackets, quotes and comments."""
    parts: list[tuple[int, str]] = []
    stack: list[str] = []
    quote = ""
    start = 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\" and quote != "`":
                i += 2  # an escaped character, the quote itself included
                continue
            if ch == quote:
                quote = ""
                start = i + 1
            i += 1
            continue
        if ch in "\"'`" or ch == "#" or ch in _OPEN or ch in _OPEN.values():
            if not stack and start < i:
                parts.append((start, expr[start:i]))
            if ch in "\"'`":
                quote = ch
            elif ch == "#":  # a comment, to the end of the line
                end = expr.find("\n", i)
                i = len(expr) if end < 0 else end
                start = i
                continue
            elif ch in _OPEN:
                stack.append(_OPEN[ch])
            elif not stack or stack.pop() != ch:
                raise ValueError(f"unbalanced {ch!r} at {i} in {expr!r}")
            start = i + 1
        i += 1
    if stack or quote:
        raise ValueError(f"unclosed {stack[-1] if stack else quote!r} in {expr!r}")
    if start < len(expr):
        parts.append((start, expr[start:]))
    return parts


def top_level_comparisons(expr: str) -> list[tuple[int, str]]:
    """(offset, operator) of each comparison outside brackets, braces and strings."""
    found: list[tuple[int, str]] = []
    for offset, text in _top_level(expr):
        j = 0
        while j < len(text):
            if text.startswith(("=~", "!~"), j):  # a regex matcher, not a comparison
                j += 2
                continue
            op = next((o for o in _COMPARISONS if text.startswith(o, j)), None)
            if op is not None:
                found.append((offset + j, op))
                j += len(op)
            else:
                j += 1
    return found


def as_data_query(expr: str, window: str = "30s", *, alert: bool = False) -> str:
    """``expr`` with Grafana's ``$__rate_interval``/``$__interval``/``$__range`` set to
    ``window``; with ``alert=True``, also its one top-level comparison made ``bool``
    (``A > B`` -> ``A > bool B``), so the query returns 0/1 instead of nothing.

    Raises ValueError (alert=True) unless there is exactly one top-level comparison and
    no top-level ``and``/``or``/``unless``.
    """
    out = _GRAFANA_WINDOW.sub(window, expr)
    if not alert:
        return out
    parts = _top_level(out)
    for _, text in parts:
        match = _SET_OPERATORS.search(text)
        if match:
            raise ValueError(f"top-level {match.group(1)!r} in alert expression {expr!r}")
    comparisons = top_level_comparisons(out)
    if len(comparisons) != 1:
        raise ValueError(
            f"{len(comparisons)} top-level comparisons in {expr!r} (exactly one is needed)"
        )
    at, op = comparisons[0]
    head, rest = out[: at + len(op)], out[at + len(op) :].lstrip()
    if re.match(r"bool(?![A-Za-z0-9_:])", rest):
        return out  # already a bool comparison
    return f"{head} bool {rest}"


# -- a real Prometheus ---------------------------------------------------------------

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """A Prometheus process scraping ``targets`` (job -> ["host:port", ...], loopback
    only), with its own config and TSDB in a temporary folder, on a free loopback port.

    ``bearer_tokens`` (job -> token) adds an Authorization header to a job's scrapes;
    ``rule_files`` are loaded as given (made absolute). Use as a context manager.
    """

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[str | os.PathLike[str]] = (),
        bearer_tokens: Mapping[str, str] | None = None,
        binary: str | os.PathLike[str] = PROMETHEUS,
        ready_timeout: float = 60.0,
    ) -> None:
        for job, addresses in targets.items():
            for address in addresses:
                if not address.startswith(tuple(f"{h}:" for h in _LOOPBACK)):
                    raise ValueError(f"{job}: {address!r} is not a loopback host:port")
        self.jobs = {job: list(addresses) for job, addresses in targets.items()}
        self.scrape_interval = scrape_interval
        self.rule_files = [str(Path(f).resolve()) for f in rule_files]
        self.bearer_tokens = dict(bearer_tokens or {})
        self.binary = Path(binary)
        self.ready_timeout = ready_timeout
        self.url = ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self._log: IO[bytes] | None = None

    # The config: one static job per entry; evaluation as often as scraping, so rules
    # and subqueries (`[10m:]`) see every sample.
    def config(self, folder: Path) -> dict[str, Any]:
        jobs: list[dict[str, Any]] = []
        for job, addresses in self.jobs.items():
            entry: dict[str, Any] = {"job_name": job, "static_configs": [{"targets": addresses}]}
            if job in self.bearer_tokens:
                token_file = folder / f"{job}.token"
                token_file.write_text(self.bearer_tokens[job], encoding="utf-8")
                entry["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
            jobs.append(entry)
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": self.rule_files,
            "scrape_configs": jobs,
        }

    def __enter__(self) -> PrometheusServer:
        if not self.binary.exists():
            raise RuntimeError(f"{self.binary} is missing: `make setup` installs prometheus")
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        folder = Path(self._dir.name)
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(folder), sort_keys=False), encoding="utf-8")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = (folder / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                str(self.binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._client = httpx.Client(base_url=self.url, timeout=30.0)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._client is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self._proc.returncode}):\n{self.log()}")
            try:
                if self._client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {self.ready_timeout}s:\n{self.log()}")

    def log(self) -> str:
        """What the process wrote so far (the last 4000 characters)."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "prometheus.log"
        return path.read_text(encoding="utf-8", errors="replace")[-4000:] if path.exists() else ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # -- the HTTP API --

    def _get(self, path: str, params: Mapping[str, Any]) -> Any:
        if self._client is None:
            raise RuntimeError("the server is not running (use it as a context manager)")
        response = self._client.get(path, params=dict(params))
        try:
            body = response.json()
        except ValueError:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text}") from None
        if body.get("status") != "success":
            raise RuntimeError(
                f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """``data.result`` of an instant query (at ``time``, Unix seconds; default now)."""
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        return list(self._get("/api/v1/query", params)["result"])

    def query_range(
        self, expr: str, start: float, end: float, step: float | str
    ) -> list[dict[str, Any]]:
        """``data.result`` of a range query."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        return list(self._get("/api/v1/query_range", params)["result"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``data.activeTargets`` of /api/v1/targets)."""
        return list(self._get("/api/v1/targets", {})["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups (``data.groups`` of /api/v1/rules)."""
        return list(self._get("/api/v1/rules", {})["groups"])

    def wait_until_scraped(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every target was scraped successfully once; return the targets."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.targets()
            if len(active) == sum(map(len, self.jobs.values())) and all(
                t["health"] == "up" for t in active
            ):
                return active
            if time.monotonic() > deadline:
                states = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in active]
                raise AssertionError(f"targets not all up after {timeout}s: {states}")
            time.sleep(0.2)

    def wait_scraped_after(self, moment: float, scrapes: int = 2, timeout: float = 60.0) -> None:
        """Wait until every target has been scraped ``scrapes`` times since ``moment``
        (Unix seconds), whether the scrape succeeded or not (a component that exited
        is scraped too): its last scrape began ``scrapes - 1`` intervals after
        ``moment`` or later. Instead of sleeping "a few scrapes" after the last event."""
        interval = _seconds(self.scrape_interval)
        since = moment + (scrapes - 1) * interval
        deadline = time.monotonic() + timeout
        while True:
            behind = [t["scrapeUrl"] for t in self.targets() if _rfc3339(t["lastScrape"]) < since]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not scraped {scrapes} times after {moment}: {behind}")
            time.sleep(0.2)


def _seconds(duration: str) -> float:
    """A Prometheus duration in seconds or milliseconds ("1s", "500ms") as seconds."""
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    if duration.endswith("s"):
        return float(duration[:-1])
    raise ValueError(f"unsupported duration {duration!r} (use s or ms)")


def _rfc3339(stamp: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds, ``Z``) as Unix seconds; a target not
    scraped yet has the zero time, which is far in the past."""
    match = re.fullmatch(r"(.+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {stamp!r}")
    base, fraction, zone = match.groups()
    whole = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    return whole.timestamp() + float(f"0.{fraction or 0}")
