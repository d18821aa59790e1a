"""Refining an existing chat corpus (method.md §4): ``corpusfactory ingest``.

Reads Fauno/Baize transcripts, OpenAssistant trees or JSONL chats
(``formats``), then repairs turn tags, drops empty, badly alternating and
duplicate-heavy conversations, checks the language of every message and
removes system prompts, counting every drop by rule (``refine``)::

    from producers.ingest import refine_file

    conversations, report = refine_file("fauno.json", "fauno", language="it")
"""

from producers.ingest.formats import (
    FORMATS,
    IngestError,
    RawConversation,
    Turn,
    read_conversations,
)
from producers.ingest.refine import (
    IngestReport,
    RefinedConversation,
    Refiner,
    fix_tags,
    refine_file,
    split_transcript,
)

__all__ = [
    "FORMATS",
    "IngestError",
    "IngestReport",
    "RawConversation",
    "RefinedConversation",
    "Refiner",
    "Turn",
    "fix_tags",
    "read_conversations",
    "refine_file",
    "split_transcript",
]
