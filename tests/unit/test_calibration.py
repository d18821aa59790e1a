"""The seed-NLL threshold cache (corpusfactory.scoring.calibration), on the demo scorer.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_calibration.py``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.scoring.calibration import calibration_key, seed_nll_threshold
from corpusfactory.scoring.nll import MLMScorer, nll_percentile

TEXTS = [
    "Il gatto dorme sul divano tutto il pomeriggio.",
    "Domani andiamo al mare se non piove.",
    "La ricetta della nonna richiede farina, uova e un pizzico di sale.",
    "Quanto costa il biglietto del treno per Firenze?",
]


@pytest.fixture(scope="module")
def scorer(demo_models: Any) -> MLMScorer:
    return MLMScorer(demo_models.scorer, masked_batch_size=128)


def test_computed_once_then_read_back(scorer: MLMScorer, tmp_path: Path) -> None:
    first, cached = seed_nll_threshold(scorer, TEXTS, 75.0, cache=tmp_path)
    assert not cached
    assert first == pytest.approx(nll_percentile(scorer, TEXTS, 75.0))
    again, cached = seed_nll_threshold(scorer, TEXTS, 75.0, cache=tmp_path)
    assert cached and again == first
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_the_key_follows_texts_percentile_and_model_files(
    scorer: MLMScorer, tmp_path: Path
) -> None:
    key = calibration_key(scorer, TEXTS, 75.0)
    assert calibration_key(scorer, TEXTS, 75.0) == key
    assert calibration_key(scorer, TEXTS[:-1], 75.0) != key
    assert calibration_key(scorer, TEXTS, 90.0) != key
    # A rebuilt model (same path, new file times) is a new key.
    weights = next(p for p in Path(scorer.id).iterdir() if p.is_file())
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert calibration_key(scorer, TEXTS, 75.0) != key
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert calibration_key(scorer, TEXTS, 75.0) == key


def test_an_unreadable_cache_file_is_recomputed(scorer: MLMScorer, tmp_path: Path) -> None:
    path = tmp_path / f"{calibration_key(scorer, TEXTS, 50.0)}.json"
    path.write_text("{not json", encoding="utf-8")
    value, cached = seed_nll_threshold(scorer, TEXTS, 50.0, cache=tmp_path)
    assert not cached
    assert value == pytest.approx(nll_percentile(scorer, TEXTS, 50.0))
    assert seed_nll_threshold(scorer, TEXTS, 50.0, cache=tmp_path) == (value, True)
