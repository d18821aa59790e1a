"""What a run left on disk, read for the report: the first decision of each turn, the
NLL series by corpus, the counts, the evaluation rows. Used by :mod:`.build`,
:mod:`.html` and :mod:`.plots`; imports no other part of the report.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.store import CorpusStore, CorpusStoreError, corpus_dir, quantiles
from corpusfactory.contract import count_decisions, first_decisions
from corpusfactory.settings import Settings

log = logging.getLogger(__name__)

SELFCHAT = "selfchat"
CORPORA = ("seeds", "generated", "accepted", "ingested")
HTML_NAME = "index.html"
JSON_NAME = "report.json"
FIGURE_NAMES = ("nll_by_corpus", "acceptance_over_time", "cosine_hist", "evaluation")


@dataclass(frozen=True)
class FigureResult:
    """One figure written: its file (in the report directory) and points per series."""

    name: str
    file: str
    caption: str
    series: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "caption": self.caption,
            "series": dict(self.series),
            "details": dict(self.details),
        }


@dataclass
class ReportResult:
    """What ``build_report`` wrote: the page, its JSON, the figures and what is missing."""

    out_dir: Path
    html: Path
    json: Path
    figures: list[FigureResult]
    missing: dict[str, str]  # figure name -> why it was not drawn
    notes: list[str]  # series left out, inputs not found
    counts: dict[str, Any]

    def figure(self, name: str) -> FigureResult:
        for fig in self.figures:
            if fig.name == name:
                return fig
        raise KeyError(f"figure {name!r} was not drawn: {self.missing.get(name, 'unknown')}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "html": str(self.html),
            "json": str(self.json),
            "figures": [f.as_dict() for f in self.figures],
            "missing": dict(self.missing),
            "notes": list(self.notes),
            "counts": self.counts,
        }


@dataclass
class RunData:
    """The inputs of a report, read once."""

    decisions: list[dict[str, Any]] = field(default_factory=list)  # one per turn
    decision_records: int = 0
    conversations: list[dict[str, Any]] = field(default_factory=list)
    seeds_nll: list[float] | None = None  # None: not scored
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def number(value: Any) -> float | None:
    """A finite number as a float, else None (a missing field, NaN, a string, a bool)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _finite(values: Iterable[Any]) -> list[float]:
    return [v for v in map(number, values) if v is not None]


def scored_decisions(decisions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decisions of turns that were NLL-scored (a turn rejected before has nll = -1)."""
    return [d for d in decisions if _finite([d.get("nll")]) and float(d["nll"]) >= 0.0]


def nll_series(data: RunData) -> dict[str, list[float]]:
    """NLL values per corpus (``CORPORA``); a corpus without any value is absent."""
    scored = scored_decisions(data.decisions)
    series: dict[str, list[float]] = {
        "seeds": list(data.seeds_nll or ()),
        "generated": [float(d["nll"]) for d in scored if d.get("source") == SELFCHAT],
        "accepted": [
            v
            for conv in data.conversations
            for v in _finite(t.get("nll") for t in conv.get("turns") or ())
            if v >= 0.0
        ],
        # Records written before decisions carried a source have "" and are neither.
        "ingested": [
            float(d["nll"]) for d in scored if str(d.get("source") or "") not in ("", SELFCHAT)
        ],
    }
    return {name: values for name, values in series.items() if values}


def searched_similarities(decisions: Iterable[dict[str, Any]]) -> list[float]:
    """Cosine with the nearest stored vector, for turns that were searched."""
    return _finite(d.get("similarity") for d in decisions if d.get("neighbour_id"))


def common_threshold(decisions: Iterable[dict[str, Any]], key: str) -> float | None:
    """The threshold most decisions were made with (None when none records one)."""
    seen = Counter(v for v in _finite(d.get(key) for d in decisions) if v > 0.0)
    return seen.most_common(1)[0][0] if seen else None


def seed_nll(settings: Settings) -> list[float]:
    """NLL of every distinct seed message, scored as the scorer worker scores turns."""
    from corpusfactory.engines.scoring.nll import MLMScorer
    from corpusfactory.seeds import load_seeds, seed_messages

    texts = [
        text
        for _, text in seed_messages(
            load_seeds(settings.producer.seed_file, settings.producer.seed_format)
        )
    ]
    scorer = MLMScorer.from_settings(settings)
    # Too long or empty messages get no score; the worker rejects such turns unscored.
    # The scores are cached per scorer and seed set (corpusfactory.engines.scoring.calibration).
    from corpusfactory.engines.scoring.calibration import seed_nll_values

    return seed_nll_values(scorer, texts)[0]


def _eval_rows(settings: Settings) -> list[dict[str, Any]]:
    # SnapshotStore creates its directory; a report must not write into the state,
    # and without the directory there is no evaluation to read anyway.
    if not settings.snapshots_path.is_dir():
        return []
    from training.evaluation.compare import compare_rows

    return compare_rows(settings)


def read_run(settings: Settings, *, seeds_nll: bool = True) -> RunData:
    """Everything the report shows, read from the state directory (never written)."""
    data = RunData()
    path = corpus_dir(settings)
    try:
        store = CorpusStore(path, read_only=True)
    except CorpusStoreError as exc:
        data.notes.append(f"no corpus: {exc}")
    else:
        records = list(store.iter_decisions())
        data.decision_records = len(records)
        data.decisions = first_decisions(records)
        data.conversations = list(store.iter_conversations())
        corrupt = int(store.stats()["corrupt_lines"])
        if corrupt:
            data.notes.append(f"{corrupt} unreadable line(s) in the corpus shards were skipped")
    if seeds_nll:
        data.seeds_nll = seed_nll(settings)
    else:
        data.notes.append("seed messages not scored (seeds_nll=False / --no-seeds)")
    data.eval_rows = _eval_rows(settings)
    return data


def compute_counts(data: RunData, series: dict[str, list[float]]) -> dict[str, Any]:
    """The report's tables (also ``report.json``)."""
    counts = count_decisions(data.decisions)
    decided = counts.decided
    by_source = Counter(str(d.get("source") or "") for d in data.decisions)
    conv_sources = Counter(str(c.get("source", "")) for c in data.conversations)
    return {
        "decisions": {
            "records": data.decision_records,
            "turns": decided,
            "repeated_records": data.decision_records - decided,
            "accepted": counts.accepted,
            "acceptance_rate": counts.acceptance_rate,
            "by_reason": counts.by_reason,
            "by_source": dict(sorted(by_source.items())),
            "nll_threshold": common_threshold(data.decisions, "nll_threshold"),
            "similarity_threshold": common_threshold(data.decisions, "similarity_threshold"),
        },
        "conversations": {
            "total": len(data.conversations),
            "by_source": dict(sorted(conv_sources.items())),
            "turns": sum(len(c.get("turns") or ()) for c in data.conversations),
        },
        "nll": {
            name: {"n": len(series.get(name, ())), **quantiles(series.get(name, ()))}
            for name in CORPORA
        },
        "evaluations": len(data.eval_rows),
    }
