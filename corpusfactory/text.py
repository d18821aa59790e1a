"""Plain-text helpers shared by the scorer and the model builders."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split a message into sentences: after '.', '!' or '?' followed by whitespace."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]
