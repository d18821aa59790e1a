"""Custom task files scored with the generic metrics of ``training.evaluation.metrics``.

A task file is UTF-8 JSONL written by the user, one object per line (blank lines are skipped),
``id`` a string or an integer and unique in the file. ``kind`` says what the rest holds:

* ``classification``: ``{"id", "prediction": str, "label": str}``. Returns
  ``classification_scores`` (fractions in [0, 1], labels = the gold labels):
  ``{"kind", "n", "accuracy", "macro_precision", "macro_recall", "macro_f1", "per_label"}``.
* ``similarity``: ``{"id", "prediction": str, "reference": str}``, scored with
  ``cosine_similarity_texts`` and the given encoder (anything with ``.encode(list[str])``).
  Returns ``{"kind", "n", "mean_cosine", "min_cosine", "max_cosine"}``.
* ``tags``: ``{"id", "prediction": [str, ...], "truth": [str, ...]}``, scored per item with
  ``tag_set_metrics`` and averaged over items. Returns ``{"kind", "n", "iou",
  "intersection_over_truth", "intersection_over_model", "normalized_levenshtein"}``.

Invalid JSON, a line that is not an object, a missing field, a wrong type or a repeated id
raises ``ValueError`` naming the file and line; so does a file with no items.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.evaluation.metrics import (
    TextEncoder,
    classification_scores,
    cosine_similarity_texts,
    mean,
    tag_set_metrics,
)

# kind -> {field: expected type}; "id" is checked separately (string or integer).
_FIELDS: dict[str, dict[str, type]] = {
    "classification": {"prediction": str, "label": str},
    "similarity": {"prediction": str, "reference": str},
    "tags": {"prediction": list, "truth": list},
}
KINDS = tuple(_FIELDS)


def _read(path: Path, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for field, expected in {"id": object, **_FIELDS[kind]}.items():
                if field not in obj:
                    raise ValueError(f"{where}: missing field {field!r}")
                if not isinstance(obj[field], expected):
                    raise ValueError(
                        f"{where}: {field!r} must be {expected.__name__}, "
                        f"got {type(obj[field]).__name__}"
                    )
                if expected is list and not all(isinstance(t, str) for t in obj[field]):
                    raise ValueError(f"{where}: {field!r} must be a list of strings")
            # bool is an int subclass, and true/false make poor ids.
            if isinstance(obj["id"], bool) or not isinstance(obj["id"], str | int):
                raise ValueError(f"{where}: 'id' must be a string or an integer")
            key = str(obj["id"])
            if key in seen:
                raise ValueError(f"{where}: repeated id {obj['id']!r}")
            seen.add(key)
            items.append(obj)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def evaluate_task_file(
    path: str | Path, kind: str, encoder: TextEncoder | None = None
) -> dict[str, Any]:
    """Score a JSONL task file of the given kind (see the module docstring for the format)."""
    if kind not in _FIELDS:
        raise ValueError(f"unknown kind {kind!r}; known: {list(KINDS)}")
    if kind == "similarity" and encoder is None:
        raise ValueError("kind 'similarity' needs an encoder")
    items = _read(Path(path), kind)
    if kind == "classification":
        scores = classification_scores(
            [it["label"] for it in items], [it["prediction"] for it in items]
        )
        return {"kind": kind, **scores}
    if kind == "similarity":
        assert encoder is not None  # checked above, before reading the file
        sims = cosine_similarity_texts(
            [it["prediction"] for it in items], [it["reference"] for it in items], encoder
        )
        return {
            "kind": kind,
            "n": len(sims),
            "mean_cosine": mean(sims),
            "min_cosine": min(sims),
            "max_cosine": max(sims),
        }
    per_item = [tag_set_metrics(it["prediction"], it["truth"]) for it in items]
    return {
        "kind": kind,
        "n": len(per_item),
        **{key: mean(m[key] for m in per_item) for key in per_item[0]},
    }
