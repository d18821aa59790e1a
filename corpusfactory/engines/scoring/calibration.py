"""The seed messages' NLL, computed once per scorer and seed set, and the threshold from it.

``admission.nll_threshold_percentile`` turns "admit what scores like the best P% of
the seeds" into a threshold, which needs every seed message scored: N masked
passes each, seconds to minutes at every scorer start (and in every report). The
scores depend only on the scorer (its files), the texts and the scoring settings,
so they are kept in ``$CORPUSFACTORY_CACHE/calibration/<key>.json`` and a
restarted or added scorer, or ``corpusfactory report``, reads them back::

    values, cached = seed_nll_values(scorer, texts)
    threshold, cached = seed_nll_threshold(scorer, texts, 95.0)

The key hashes the scorer's id, the names, sizes and modification times of the
files of a local model directory (a rebuilt model is a new key; for a hub id only
its name counts), the device, the granularity, the token limit and the texts. A
cache file that cannot be read is recomputed and rewritten; writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from corpusfactory.atomicio import write_json_atomic
from corpusfactory.engines.scoring.nll import MLMScorer, percentile_of, scored_values

log = logging.getLogger(__name__)


def calibration_dir() -> Path:
    from corpusfactory.cache import cache_root

    return cache_root() / "calibration"


def calibration_key(scorer: MLMScorer, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    parts: list[str] = [
        scorer.id,
        str(scorer.device),
        scorer.granularity,
        str(scorer.max_tokens),
        *([] if scorer.precision == "float32" else [scorer.precision]),
    ]
    model_dir = Path(scorer.id)
    if model_dir.is_dir():
        for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            st = f.stat()
            parts.append(f"{f.relative_to(model_dir)}:{st.st_size}:{st.st_mtime_ns}")
    for part in parts:
        h.update(part.encode("utf-8") + b"\0")
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()[:32]


def seed_nll_values(
    scorer: MLMScorer, texts: Sequence[str], cache: Path | None = None
) -> tuple[list[float], bool]:
    """(the NLL of every text that can be scored, whether it came from the cache).

    Empty and too-long texts get no score (the scorer worker rejects such turns
    unscored) and are left out.
    """
    folder = cache or calibration_dir()
    path = folder / f"{calibration_key(scorer, texts)}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["values"]
        return [float(v) for v in stored], True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable NLL calibration %s (%s): computing it again", path, exc)
    values = scored_values(scorer.score(list(texts)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"scorer": scorer.id, "texts": len(texts), "values": values}
        write_json_atomic(path, record, indent=None)
    except OSError as exc:  # a read-only cache costs time at the next start, nothing else
        log.warning("cannot store the NLL calibration in %s: %s", folder, exc)
    return values, False


def seed_nll_threshold(
    scorer: MLMScorer, texts: Sequence[str], pct: float, cache: Path | None = None
) -> tuple[float, bool]:
    """(the ``pct``-th percentile of the texts' NLL, whether the scores came from the
    cache); the same figure as ``scoring.nll.nll_percentile``."""
    if not 0.0 <= pct <= 100.0:  # before any scoring
        raise ValueError(f"pct must lie in [0, 100], got {pct}")
    values, cached = seed_nll_values(scorer, texts, cache)
    return percentile_of(values, pct), cached
