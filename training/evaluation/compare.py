"""``corpusfactory eval compare``: one row per model, like the paper's tables (method.md §6).

Rows: the base model, then every snapshot, oldest first. Columns: conversations trained
on (the snapshot and its ancestors), SQuAD-it F1 and EM, macro F1 of each EVALITA task,
held-out perplexity (with the base model's on the same conversations), and the mean
MLM-NLL of the model's own generations. A task without a result shows ``-``.
"""

from __future__ import annotations

from typing import Any

from corpusfactory.settings import Settings
from training.snapshots import BASE_ID, SnapshotStore

COLUMNS = (
    ("model", "model"),
    ("trained", "conversations"),
    ("squad_it_f1", "SQuAD-it F1"),
    ("squad_it_em", "EM"),
    ("sentipolc2014_f1", "sentiment F1"),
    ("ironita2018_f1", "irony F1"),
    ("ami2020_f1", "toxicity F1"),
    ("heldout_ppl", "held-out ppl"),
    ("base_heldout_ppl", "base ppl"),
    ("generation_nll", "gen. NLL"),
)


def _row(model: str, trained: int | None, ev: dict[str, Any]) -> dict[str, Any]:
    def get(task: str, key: str) -> Any:
        return ev.get(task, {}).get(key)

    return {
        "model": model,
        "trained": trained,
        "squad_it_f1": get("squad_it", "f1"),
        "squad_it_em": get("squad_it", "em"),
        "squad_it_n": get("squad_it", "n"),
        "sentipolc2014_f1": get("sentipolc2014", "macro_f1"),
        "ironita2018_f1": get("ironita2018", "macro_f1"),
        "ami2020_f1": get("ami2020", "macro_f1"),
        "heldout_ppl": get("heldout", "perplexity"),
        "base_heldout_ppl": get("heldout", "base_perplexity"),
        "heldout_n": get("heldout", "n"),
        "generation_nll": get("generation_nll", "mean"),
    }


def compare_rows(settings: Settings) -> list[dict[str, Any]]:
    store = SnapshotStore(settings.snapshots_path)
    base = settings.training.base_model
    rows = [_row(f"{BASE_ID} ({base})", 0, store.evaluations(BASE_ID, base))]
    for snap in store.all():
        rows.append(_row(snap.id, len(store.trained_ids(snap)), store.evaluations(snap.id)))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table."""
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r[key]) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([header, rule, *body])
