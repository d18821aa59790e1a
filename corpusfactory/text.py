"""Plain-text helpers: sentence splitting (scorer, model builders) and the one stop-string
cut (generators, evaluation, serving)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split a message into sentences: after '.', '!' or '?' followed by whitespace."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for s in stop:
        if s:
            pos = text.find(s)
            if pos != -1 and pos < cut:
                cut = pos
    return text[:cut]
