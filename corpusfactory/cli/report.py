"""The ``corpusfactory report`` command: a static HTML report with PNG plots of a run.

    corpusfactory report [--config FILE] [--state-dir DIR] [--out DIR] [--no-seeds] [--json]

Reads the state directory of the settings (corpus store, seeds, snapshots and their
evaluations; read-only, so a running factory is fine) and writes ``index.html``,
``report.json`` and the figures to ``--out`` (default ``<state_dir>/report``); see
``corpusfactory.tools.report.build``. ``--no-seeds`` skips scoring the seed messages (the one
step that loads a model); ``--json`` prints the result (figures, points per series,
counts) as JSON instead of the short summary.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpusfactory.settings import Settings

SettingsFn = Callable[[argparse.Namespace], Settings]


def cmd_report(args: argparse.Namespace, s: Settings) -> int:
    from corpusfactory.tools.report.build import build_report

    out = Path(args.out) if args.out else s.state_path / "report"
    result = build_report(s, out, seeds_nll=not args.no_seeds)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
        return 0
    print(f"report: {result.html}")
    for fig in result.figures:
        points = ", ".join(f"{k} {v}" for k, v in fig.series.items())
        print(f"  {fig.file}: {points}")
    for name, why in result.missing.items():
        print(f"  {name}: not drawn ({why})")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def add_commands(
    add: Callable[[str, Callable[[argparse.Namespace], int], str], Any], settings: SettingsFn
) -> None:
    p = add(
        "report",
        lambda args: cmd_report(args, settings(args)),
        "Write a static HTML report with PNG plots of the run (NLL by corpus, admission, "
        "cosine, evaluations).",
    )
    p.add_argument("--out", help="output directory (default <state_dir>/report)")
    p.add_argument(
        "--no-seeds", action="store_true", help="do not NLL-score the seed messages (no model)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
