"""Run a test tier as several pytest processes side by side: ``make test`` runs the
integration tier this way (``TEST_SHARDS``, 2 by default; 1 runs it as one process).

The integration tests spend much of their time waiting on engines: a broker that
restarts, a consumer-group session that times out, a Milvus server coming back, a
worker loading its models. One pytest process keeps about 0.6 of this machine's two
cores busy over the tier (user + system CPU over wall time, measured on a run of the
whole tier), so a second process over other modules fills the gaps.

* Modules are dealt whole (their module fixtures stay in one process), longest
  first, each to the shard with the least work so far, by the seconds each took in a
  measured run (``tests/integration/durations.json``; a module not listed there
  counts as the median).
* Modules that use one of the session fixtures that are costly to start
  (``SHARED``: the default worker stack, the Milvus server) go together to one shard,
  so that each is started once.
* Each shard is its own pytest session: its own session broker, its own temporary
  folders. Tests that need a port take a free one, so shards do not collide.
* Each shard's output goes to a log file; the logs are printed once the shards are
  done, one after the other, and the exit status is the first failing shard's.
  SIGINT and SIGTERM are passed on to every shard (pytest then tears its fixtures
  down: brokers and servers stop).

Usage: ``python -m tests.shards [--shards N] [--log-dir DIR] PATH [pytest args...]``;
``python -m tests.shards --record JUNIT...`` writes the durations of measured runs.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from xml.etree import ElementTree

DURATIONS = Path(__file__).resolve().parent / "integration" / "durations.json"

# Session fixtures costly enough that the modules using them share a shard.
SHARED = ("default_stack", "milvus_server")


def modules(path: Path) -> list[Path]:
    """The test modules under ``path`` (or ``path`` itself), sorted."""
    if path.is_file():
        return [path]
    return sorted(path.rglob("test_*.py"))


def groups(found: list[Path]) -> list[list[Path]]:
    """``found`` in groups that must share a process: the users of each SHARED
    fixture together (a module using two of them joins both groups into one)."""
    out: list[tuple[set[str], list[Path]]] = []
    for module in found:
        text = module.read_text(encoding="utf-8")
        uses = {name for name in SHARED if re.search(rf"\b{name}\b", text)}
        joined = [g for g in out if g[0] & uses]
        merged = (uses.union(*(u for u, _ in joined)), [m for _, ms in joined for m in ms])
        out = [g for g in out if all(g is not j for j in joined)]
        out.append((merged[0], [*merged[1], module]))
    return [members for _, members in out]


def deal(found: list[Path], shards: int, seconds: dict[str, float]) -> list[list[Path]]:
    """Longest group first, each to the shard with the least seconds so far."""
    default = statistics.median(seconds.values()) if seconds else 60.0

    def cost(group: list[Path]) -> float:
        return sum(seconds.get(m.name, default) for m in group)

    dealt: list[list[Path]] = [[] for _ in range(shards)]
    load = [0.0] * shards
    for group in sorted(groups(found), key=cost, reverse=True):
        i = load.index(min(load))
        dealt[i].extend(group)
        load[i] += cost(group)
    return [sorted(shard) for shard in dealt if shard]


def read_durations(path: Path = DURATIONS) -> dict[str, float]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): float(v) for k, v in data["seconds"].items()}


def record(junit_files: list[Path], path: Path = DURATIONS) -> dict[str, float]:
    """Write the seconds per module (setup, calls and teardown of its tests) of
    measured runs (pytest ``--junitxml`` files) to ``path``; returns them."""
    seconds: dict[str, float] = {}
    for junit in junit_files:
        for case in ElementTree.parse(junit).iter("testcase"):
            module = case.get("classname", "").split(".")[-1] + ".py"
            seconds[module] = seconds.get(module, 0.0) + float(case.get("time", 0.0))
    rounded = {k: round(v, 1) for k, v in sorted(seconds.items())}
    note = "seconds per module in a measured run (python -m tests.shards --record JUNIT)"
    path.write_text(json.dumps({"note": note, "seconds": rounded}, indent=1) + "\n", "utf-8")
    return rounded


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--record"]:
        record([Path(a) for a in argv[1:]])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--log-dir", type=Path, default=Path(".state") / "test-shards")
    parser.add_argument("path", type=Path)
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="given to each pytest")
    args = parser.parse_args(argv)
    pytest_args = list(args.pytest_args)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    found = modules(args.path)
    if not found:
        parser.error(f"no test modules under {args.path}")
    dealt = deal(found, args.shards, read_durations())
    args.log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    for i, shard in enumerate(dealt):
        log = args.log_dir / f"shard-{i}.log"
        names = " ".join(m.name for m in shard)
        print(f"shard {i}: {names} (log: {log})", flush=True)
        with open(log, "wb") as out:
            cmd = [sys.executable, "-m", "pytest", *pytest_args, *map(str, shard)]
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log))

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started = time.monotonic()
    codes = []
    for i, (proc, log) in enumerate(procs):
        codes.append(proc.wait())  # SIGINT no longer raises here: it is forwarded
        took = time.monotonic() - started
        print(f"\n===== shard {i} exited {codes[-1]} after {took:.0f}s =====", flush=True)
        sys.stdout.write(log.read_text(encoding="utf-8", errors="replace"))
        sys.stdout.flush()
    failed = [c for c in codes if c != 0]
    return failed[0] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
