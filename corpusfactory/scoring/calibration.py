"""The NLL threshold as a percentile of the seed messages' NLL, computed once per setup.

``admission.nll_threshold_percentile`` turns "admit what scores like the best P% of
the seeds" into a threshold, which needs every seed message scored: N masked
passes each, seconds to minutes at every scorer start. The result depends only on
the scorer (its files), the seed texts, the percentile and the scoring settings,
so it is kept in ``$CORPUSFACTORY_CACHE/calibration/<key>.json`` and a restarted
or added scorer reads it back::

    threshold, cached = seed_nll_threshold(scorer, texts, 95.0)

The key hashes the scorer's id, the names, sizes and modification times of the
files of a local model directory (a rebuilt model is a new key), the device, the
granularity, the token limit, the texts and the percentile. A cache file that
cannot be read is recomputed and rewritten; writes are atomic (rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from corpusfactory.scoring.nll import MLMScorer, nll_percentile

log = logging.getLogger(__name__)


def calibration_dir() -> Path:
    from corpusfactory.broker import cache_root_dir

    return cache_root_dir() / "calibration"


def calibration_key(scorer: MLMScorer, texts: Sequence[str], pct: float) -> str:
    h = hashlib.sha256()
    parts: list[str] = [
        scorer.id,
        str(scorer.device),
        scorer.granularity,
        str(scorer.max_tokens),
        repr(float(pct)),
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


def seed_nll_threshold(
    scorer: MLMScorer, texts: Sequence[str], pct: float, cache: Path | None = None
) -> tuple[float, bool]:
    """(the ``pct``-th percentile of the texts' NLL, whether it came from the cache)."""
    folder = cache or calibration_dir()
    path = folder / f"{calibration_key(scorer, texts, pct)}.json"
    try:
        value = float(json.loads(path.read_text(encoding="utf-8"))["threshold"])
        return value, True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable NLL calibration %s (%s): computing it again", path, exc)
    value = nll_percentile(scorer, texts, pct)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".calibration-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"threshold": value, "scorer": scorer.id, "pct": pct, "n": len(texts)}, fh)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs time at the next start, nothing else
        log.warning("cannot store the NLL calibration in %s: %s", folder, exc)
    return value, False
