"""The HTML page of the run report (``corpusfactory.tools.report.build``): one self-contained file.

``render_html(settings, result, eval_rows, generated_at)`` returns the page that
``build_report`` writes as ``index.html``: the settings in force, the count tables,
each figure as ``<img>`` beside its caption (or why it is missing) and the
evaluation table. Every text that comes from data or settings goes through
``html.escape``: source names, reasons and model ids are not trusted.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from consumers.store import QUANTILES
from corpusfactory.settings import Settings
from corpusfactory.tools.report.data import CORPORA, FIGURE_NAMES, ReportResult

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.missing { color: #a33; font-style: italic; }
"""

FIGURE_TITLES = {
    "nll_by_corpus": "NLL by corpus",
    "acceptance_over_time": "Acceptance over time",
    "cosine_hist": "Nearest-neighbour cosine",
    "evaluation": "Evaluation across snapshots",
}


def e(value: Any) -> str:
    """Escaped text of a value (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def cell(value: Any) -> str:
    """A table cell's text: - for missing, 4 significant digits for floats."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(cell(v))}</td>" for v in row) + "</tr>\n" for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _settings_rows(settings: Settings, counts: dict[str, Any]) -> list[tuple[str, Any]]:
    adm = settings.admission
    dec = counts["decisions"]
    rows: list[tuple[str, Any]] = [
        ("state directory", str(settings.state_path)),
        ("similarity threshold (settings)", adm.similarity_threshold),
        ("similarity threshold (most decisions)", dec["similarity_threshold"]),
        ("NLL threshold (settings)", adm.nll_threshold),
        ("NLL threshold percentile of the seeds", adm.nll_threshold_percentile),
        ("NLL threshold (most decisions)", dec["nll_threshold"]),
        ("NLL scorer", settings.models.scorer),
        ("seed file", settings.producer.seed_file or "built-in"),
    ]
    if adm.decontaminate:
        rows.append(("contamination threshold", adm.contamination_threshold))
    if settings.judge.enabled:
        rows.append(("LLM judge threshold", settings.judge.threshold))
    return rows


def _counts_html(counts: dict[str, Any]) -> str:
    dec = counts["decisions"]
    conv = counts["conversations"]
    parts = ["<h2>Counts</h2>\n"]
    parts.append(
        f"<p>{e(dec['turns'])} decided turn(s) from {e(dec['records'])} decision record(s) "
        f"({e(dec['repeated_records'])} repeated record(s) not counted again); acceptance "
        f"rate {e(cell(dec['acceptance_rate']))}.</p>\n"
    )
    parts.append("<h3>Decided turns by reason</h3>\n")
    parts.append(table(("reason", "turns"), dec["by_reason"].items()))
    parts.append("<h3>Decided turns by source</h3>\n")
    if dec["by_source"]:
        named = ((src or "(not recorded)", n) for src, n in dec["by_source"].items())
        parts.append(table(("source", "turns"), named))
    else:
        parts.append('<p class="missing">No decisions.</p>\n')
    parts.append(
        f"<h3>Accepted conversations by source</h3>\n<p>{e(conv['total'])} conversation(s), "
        f"{e(conv['turns'])} turn(s).</p>\n"
    )
    if conv["by_source"]:
        parts.append(table(("source", "conversations"), conv["by_source"].items()))
    else:
        parts.append('<p class="missing">No accepted conversations.</p>\n')
    parts.append("<h3>NLL quantiles by corpus</h3>\n")
    names = [name for name, _ in QUANTILES]
    rows = [[c, counts["nll"][c]["n"], *(counts["nll"][c][q] for q in names)] for c in CORPORA]
    parts.append(table(("corpus", "n", *names), rows))
    return "".join(parts)


def _figures_html(result: ReportResult) -> str:
    by_name = {f.name: f for f in result.figures}
    parts = ["<h2>Figures</h2>\n"]
    for name in FIGURE_NAMES:
        parts.append(f"<h3>{e(FIGURE_TITLES[name])}</h3>\n")
        fig = by_name.get(name)
        if fig is None:
            why = result.missing.get(name, "no data")
            parts.append(f'<p class="missing">Not drawn: {e(why)}.</p>\n')
            continue
        points = ", ".join(f"{k}: {v}" for k, v in fig.series.items())
        parts.append(
            f'<figure><img src="{e(fig.file)}" alt="{e(FIGURE_TITLES[name])}">'
            f"<figcaption>{e(fig.caption)} Points per series: {e(points)}.</figcaption>"
            "</figure>\n"
        )
    return "".join(parts)


def _evaluation_html(eval_rows: list[dict[str, Any]]) -> str:
    from training.evaluation.compare import COLUMNS

    parts = ["<h2>Evaluation</h2>\n"]
    if not eval_rows:
        parts.append('<p class="missing">No evaluations: no snapshot directory yet.</p>\n')
        return "".join(parts)
    rows = [[row.get(key) for key, _ in COLUMNS] for row in eval_rows]
    parts.append(table([title for _, title in COLUMNS], rows))
    return "".join(parts)


def render_html(
    settings: Settings, result: ReportResult, eval_rows: list[dict[str, Any]], generated_at: str
) -> str:
    """The whole page (UTF-8 text)."""
    notes = "".join(f"<li>{e(n)}</li>\n" for n in result.notes)
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
            "<title>corpusfactory report</title>\n",
            f"<style>{_STYLE}</style>\n</head>\n<body>\n",
            "<h1>corpusfactory report</h1>\n",
            f"<p>Generated {e(generated_at)}.</p>\n",
            "<h2>Settings</h2>\n",
            table(("setting", "value"), _settings_rows(settings, result.counts)),
            f"<h2>Notes</h2>\n<ul>\n{notes}</ul>\n" if notes else "",
            _counts_html(result.counts),
            _figures_html(result),
            _evaluation_html(eval_rows),
            "</body>\n</html>\n",
        ]
    )
