"""The run report: a static HTML page with PNG plots of what a run left on disk.

    from corpusfactory.tools.report.build import build_report
    from corpusfactory.settings import load_settings

    result = build_report(load_settings("configs/demo.yaml"), Path("report"))

or from the shell ``corpusfactory report --config configs/demo.yaml [--out DIR]
[--no-seeds] [--json]`` (``corpusfactory.cli.report``). Open ``index.html`` in a
browser; ``report.json`` beside it holds the same counts for scripts.

What it reads, all under ``state_dir`` and read-only (a running writer is fine):

* the corpus store (``<state_dir>/corpus``): the accepted conversations and the
  decision shards. A turn may have several decision records (a replayed turn is
  answered again with its first decision); each turn counts once, with its first
  non-replayed decision (or its first record, when only replays were stored);
* the seed messages (``producer.seed_file``), NLL-scored with ``models.scorer``
  like the scorer worker does, unless ``seeds_nll=False``;
* the evaluations of the base model and of every snapshot (``eval compare``).

Figures (``corpusfactory.tools.report.plots``): ``nll_by_corpus.png`` (the paper's
figure 4 for this run: NLL of the seeds, of the generated and ingested turns
that were scored, and of the accepted turns), ``acceptance_over_time.png``,
``cosine_hist.png`` and ``evaluation.png``. A series without data is left out
and a figure without any data is not drawn; the page says which and why.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from corpusfactory.atomicio import write_text_atomic
from corpusfactory.settings import Settings
from corpusfactory.tools.report.data import (
    CORPORA,
    FIGURE_NAMES,
    HTML_NAME,
    JSON_NAME,
    ReportResult,
    compute_counts,
    nll_series,
    number,
    read_run,
    scored_decisions,
)

log = logging.getLogger(__name__)


def build_report(
    settings: Settings, out_dir: str | os.PathLike[str], *, seeds_nll: bool = True
) -> ReportResult:
    """Read the run of ``settings`` and write ``index.html``, ``report.json`` and the PNGs."""
    from corpusfactory.tools.report.html import render_html
    from corpusfactory.tools.report.plots import draw_figures

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = read_run(settings, seeds_nll=seeds_nll)
    series = nll_series(data)
    counts = compute_counts(data, series)
    notes = list(data.notes)
    notes.extend(
        f"NLL by corpus: no {name} data, series left out" for name in CORPORA if name not in series
    )
    unsourced = sum(1 for d in scored_decisions(data.decisions) if not d.get("source"))
    if unsourced:
        notes.append(
            f"{unsourced} scored turn(s) without a recorded source (decided before decisions "
            "carried one) are in neither the generated nor the ingested series"
        )
    untimed = sum(1 for d in data.decisions if (number(d.get("decided_at")) or 0.0) <= 0.0)
    if untimed:
        notes.append(f"{untimed} decided turn(s) without a decision time are not on the timeline")
    figures, missing = draw_figures(data, series, counts, out)
    for name in FIGURE_NAMES:
        if name in missing:
            # A figure of an earlier report in this directory must not pass for this run's.
            (out / f"{name}.png").unlink(missing_ok=True)
    result = ReportResult(
        out_dir=out,
        html=out / HTML_NAME,
        json=out / JSON_NAME,
        figures=figures,
        missing=missing,
        notes=notes,
        counts=counts,
    )
    generated_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_text_atomic(
        result.json, json.dumps(result.as_dict(), indent=2, ensure_ascii=False) + "\n"
    )
    write_text_atomic(result.html, render_html(settings, result, data.eval_rows, generated_at))
    log.info("report: %s (%d figure(s), %d missing)", result.html, len(figures), len(missing))
    return result
