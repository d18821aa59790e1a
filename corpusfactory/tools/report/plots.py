"""The PNG figures of the run report (``corpusfactory.tools.report.build``), drawn with matplotlib.

Called by ``build_report``; ``draw_figures(data, series, counts, out_dir)`` writes
every figure that has data and returns the ones written and why the others are not.
Drawing uses the Agg backend (files only, no display) on ``matplotlib.figure.Figure``
objects, not pyplot, so no global figure state outlives a report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from corpusfactory.contract import Reason
from corpusfactory.tools.report.data import (
    CORPORA,
    FigureResult,
    RunData,
    number,
    searched_similarities,
)

if TYPE_CHECKING:  # matplotlib itself is imported only when a figure is drawn
    from matplotlib.figure import Figure

DPI = 100
MAX_TIME_BINS = 30
# Bin widths for the acceptance-over-time figure, in seconds: the first one that
# splits the run's span into at most MAX_TIME_BINS bins is used.
NICE_WIDTHS = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
    3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800,
)  # fmt: skip
CORPUS_COLOURS = {
    "seeds": "tab:blue",
    "generated": "tab:orange",
    "accepted": "tab:green",
    "ingested": "tab:purple",
}
SCORE_KEYS = ("squad_it_f1", "squad_it_em", "sentipolc2014_f1", "ironita2018_f1", "ami2020_f1")
LOWER_KEYS = ("heldout_ppl", "base_heldout_ppl", "generation_nll")


def _figure(width: float, height: float, rows: int = 1) -> tuple[Figure, list[Any]]:
    import matplotlib

    # Explicit, here rather than at import: the report only ever writes files, and
    # importing this module must not change the backend of a program that imports it.
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)
    return fig, [axes[i][0] for i in range(rows)]


def label(text: str) -> str:
    """Text safe for a matplotlib label: no mathtext ($), not hidden (leading _)."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, format="png")


def nll_figure(
    series: dict[str, list[float]], threshold: float | None, path: Path
) -> dict[str, Any]:
    """Overlaid density histograms on common bins, one per corpus, and the threshold."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    lo, hi = float(values.min()), float(values.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n_bins = int(min(60, max(10, math.sqrt(values.size))))
    bins = np.linspace(lo, hi, n_bins + 1)
    fig, (ax,) = _figure(8, 4.5)
    for name in CORPORA:
        if name in series:
            ax.hist(
                series[name],
                bins=bins,
                density=True,
                histtype="stepfilled",
                alpha=0.35,
                edgecolor=CORPUS_COLOURS[name],
                color=CORPUS_COLOURS[name],
                linewidth=1.5,
                label=f"{name} (n={len(series[name])})",
            )
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("MLM NLL per token (nat)")
    ax.set_ylabel("density")
    ax.set_title("NLL by corpus")
    ax.legend()
    _save(fig, path)
    return {"bins": n_bins, "range": [lo, hi], "threshold": threshold}


def time_bins(span: float) -> tuple[float, int]:
    """(bin width in seconds, number of bins) for a run lasting ``span`` seconds."""
    span = max(0.0, span)
    for nice in NICE_WIDTHS:
        if math.floor(span / nice) + 1 <= MAX_TIME_BINS:
            return float(nice), math.floor(span / nice) + 1
    # Longer than MAX_TIME_BINS weeks: equal bins, the last one starting at the end.
    return span / (MAX_TIME_BINS - 1), MAX_TIME_BINS


def _time_unit(width: float) -> tuple[str, float]:
    if width < 60:
        return "s", 1.0
    if width < 3600:
        return "min", 60.0
    if width < 86400:
        return "h", 3600.0
    return "d", 86400.0


def acceptance_figure(decisions: Sequence[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Acceptance rate per time bin (top) and decisions by reason per bin (bottom)."""
    times = [float(d["decided_at"]) for d in decisions]
    t0 = min(times)
    width, n = time_bins(max(times) - t0)
    counts: dict[str, np.ndarray] = {}
    for d, t in zip(decisions, times, strict=True):
        reason = str(d["reason"])
        if reason not in counts:
            counts[reason] = np.zeros(n)
        counts[reason][min(n - 1, int((t - t0) // width))] += 1
    known = [r.value for r in Reason]
    order = [r for r in known if r in counts] + sorted(r for r in counts if r not in known)
    total = sum(counts.values(), np.zeros(n))
    accepted = counts.get(Reason.ACCEPTED, np.zeros(n))
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(total > 0, accepted / total, np.nan)
    unit, scale = _time_unit(width)
    x = np.arange(n) * width / scale
    bar = width / scale * 0.9
    fig, (top, bottom) = _figure(8, 6, rows=2)
    top.plot(x + bar / 2, rate, marker="o", color="tab:green")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("acceptance rate")
    top.set_title(f"Admission over time (bins of {width:g} s)")
    base = np.zeros(n)
    cmap: dict[str, str] = {Reason.ACCEPTED.value: "tab:green"}
    palette = iter(("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                    "tab:gray", "tab:olive", "tab:cyan", "tab:blue"))  # fmt: skip
    for reason in order:
        colour = cmap.get(reason) or next(palette, None)
        bottom.bar(
            x,
            counts[reason],
            width=bar,
            bottom=base,
            align="edge",
            label=label(reason),
            color=colour,
        )
        base = base + counts[reason]
    bottom.set_xlabel(f"time since the first decision ({unit})")
    bottom.set_ylabel("decided turns")
    bottom.legend(fontsize="small", ncols=min(4, len(order)))
    _save(fig, path)
    return {"bin_s": width, "bins": n, "start": t0, "nonempty_bins": int((total > 0).sum())}


def cosine_figure(values: Sequence[float], threshold: float | None, path: Path) -> dict[str, Any]:
    """Histogram of the nearest-neighbour cosine of searched turns, and the threshold."""
    fig, (ax,) = _figure(8, 4.5)
    lo = min(0.0, min(values))
    bins = np.linspace(lo, 1.0, 41 if lo >= 0 else 81)
    ax.hist(
        values, bins=bins, color="tab:blue", alpha=0.8, label=f"searched turns (n={len(values)})"
    )
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("cosine similarity with the nearest stored message")
    ax.set_ylabel("turns")
    ax.set_title("Nearest-neighbour cosine")
    ax.legend()
    _save(fig, path)
    return {"threshold": threshold}


def _metric_values(rows: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    # A perplexity over no conversation is NaN: a missing value, not a bar.
    return [number(row.get(key)) for row in rows]


def evaluation_series(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Metric -> number of models with a finite value (metrics without any left out)."""
    out = {}
    for key in (*SCORE_KEYS, *LOWER_KEYS):
        n = sum(v is not None for v in _metric_values(rows, key))
        if n:
            out[key] = n
    return out


def evaluation_figure(rows: Sequence[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Grouped bars: one group per metric, one bar per model (base, then snapshots)."""
    from training.evaluation.compare import COLUMNS

    titles = dict(COLUMNS)
    present = evaluation_series(rows)
    groups = [
        (keys, ylabel)
        for keys, ylabel in (
            ([k for k in SCORE_KEYS if k in present], "score (0-100, higher is better)"),
            ([k for k in LOWER_KEYS if k in present], "perplexity / NLL (lower is better)"),
        )
        if keys
    ]
    fig, axes = _figure(max(6.0, 1.2 * len(present) + 3), 3.5 * len(groups), rows=len(groups))
    width = 0.8 / max(1, len(rows))
    for ax, (keys, ylabel) in zip(axes, groups, strict=True):
        x = np.arange(len(keys))
        for i, row in enumerate(rows):
            heights = [_metric_values([row], k)[0] for k in keys]
            ax.bar(
                x + (i - (len(rows) - 1) / 2) * width,
                [h if h is not None else np.nan for h in heights],
                width=width,
                label=label(str(row.get("model", f"model {i}"))),
            )
        ax.set_xticks(x, [label(titles.get(k, k)) for k in keys])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    axes[0].set_title("Evaluation: base model and snapshots")
    _save(fig, path)
    return {"models": [str(r.get("model", "")) for r in rows]}


def draw_figures(
    data: RunData, series: dict[str, list[float]], counts: dict[str, Any], out: Path
) -> tuple[list[FigureResult], dict[str, str]]:
    """Draw every figure that has data; return them and, for the others, why not."""
    figures: list[FigureResult] = []
    missing: dict[str, str] = {}
    dec = counts["decisions"]

    if series:
        details = nll_figure(series, dec["nll_threshold"], out / "nll_by_corpus.png")
        figures.append(
            FigureResult(
                "nll_by_corpus",
                "nll_by_corpus.png",
                "MLM NLL by corpus (normalised histograms on common bins): the seed messages, "
                "the generated (self-chat) and ingested turns that were scored, and the turns "
                "of the accepted conversations; the dashed line is the NLL threshold.",
                {name: len(values) for name, values in series.items()},
                details,
            )
        )
    else:
        missing["nll_by_corpus"] = (
            "no NLL values: no seeds scored, no scored turn, no accepted turn"
        )

    # Records from before decisions carried a time have decided_at = 0.
    timed = [d for d in data.decisions if (number(d.get("decided_at")) or 0.0) > 0.0]
    if timed:
        details = acceptance_figure(timed, out / "acceptance_over_time.png")
        details["untimed"] = len(data.decisions) - len(timed)
        reasons = Counter(str(d["reason"]) for d in timed)
        figures.append(
            FigureResult(
                "acceptance_over_time",
                "acceptance_over_time.png",
                f"Share of decided turns accepted per {details['bin_s']:g}-second bin (top) and "
                "decided turns by reason per bin (bottom); each turn counted once.",
                {"decisions": len(timed), **dict(reasons)},
                details,
            )
        )
    else:
        missing["acceptance_over_time"] = (
            "no decisions with a decision time" if data.decisions else "no decisions"
        )

    sims = searched_similarities(data.decisions)
    if sims:
        thr = dec["similarity_threshold"]
        details = cosine_figure(sims, thr, out / "cosine_hist.png")
        figures.append(
            FigureResult(
                "cosine_hist",
                "cosine_hist.png",
                "Cosine similarity of each decided turn with its nearest stored message (turns "
                "that were searched); above the dashed threshold a turn is a near-duplicate.",
                {"searched": len(sims)},
                details,
            )
        )
    else:
        missing["cosine_hist"] = (
            "no decided turn was searched (none has a nearest neighbour)"
            if data.decisions
            else "no decisions"
        )

    eval_series = evaluation_series(data.eval_rows)
    if eval_series:
        details = evaluation_figure(data.eval_rows, out / "evaluation.png")
        figures.append(
            FigureResult(
                "evaluation",
                "evaluation.png",
                "Evaluation scores of the base model and each snapshot, grouped by metric "
                "(a model without a value for a metric has no bar there; - in the table).",
                eval_series,
                details,
            )
        )
    else:
        missing["evaluation"] = (
            "no evaluation results" if data.eval_rows else "no base model or snapshot evaluated"
        )
    return figures, missing
