"""The seed-NLL threshold cache (corpusfactory.engines.scoring.calibration), on the demo scorer.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_calibration.py``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.engines.scoring.calibration import (
    calibration_key,
    seed_nll_threshold,
    seed_nll_values,
)
from corpusfactory.engines.scoring.nll import MLMScorer, nll_percentile
from corpusfactory.errors import ModelError

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
    # One file of scores serves every percentile.
    low, cached = seed_nll_threshold(scorer, TEXTS, 10.0, cache=tmp_path)
    assert cached and low == pytest.approx(nll_percentile(scorer, TEXTS, 10.0)) and low < first
    assert len(list(tmp_path.glob("*.json"))) == 1
    values, cached = seed_nll_values(scorer, TEXTS, cache=tmp_path)
    assert cached and values == pytest.approx([r.nll for r in scorer.score(TEXTS)])


def test_unscorable_texts_are_left_out_and_none_left_is_an_error(
    scorer: MLMScorer, tmp_path: Path
) -> None:
    values, _ = seed_nll_values(scorer, [TEXTS[0], "", "   "], cache=tmp_path)
    assert len(values) == 1
    with pytest.raises(ModelError, match="no text could be scored"):
        seed_nll_threshold(scorer, ["", " "], 50.0, cache=tmp_path)
    with pytest.raises(ValueError, match="pct"):
        seed_nll_threshold(scorer, TEXTS, 120.0, cache=tmp_path)


def test_the_key_follows_texts_and_model_files(scorer: MLMScorer) -> None:
    key = calibration_key(scorer, TEXTS)
    assert calibration_key(scorer, TEXTS) == key
    assert calibration_key(scorer, TEXTS[:-1]) != key
    assert calibration_key(scorer, list(reversed(TEXTS))) != key
    # A rebuilt model (same path, new file times) is a new key.
    weights = next(p for p in Path(scorer.id).iterdir() if p.is_file())
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert calibration_key(scorer, TEXTS) != key
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert calibration_key(scorer, TEXTS) == key


def test_an_unreadable_cache_file_is_recomputed(scorer: MLMScorer, tmp_path: Path) -> None:
    path = tmp_path / f"{calibration_key(scorer, TEXTS)}.json"
    path.write_text("{not json", encoding="utf-8")
    value, cached = seed_nll_threshold(scorer, TEXTS, 50.0, cache=tmp_path)
    assert not cached
    assert value == pytest.approx(nll_percentile(scorer, TEXTS, 50.0))
    assert seed_nll_threshold(scorer, TEXTS, 50.0, cache=tmp_path) == (value, True)
