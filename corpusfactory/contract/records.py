"""The typed records (faust ``Record``s) written to the contract's topics."""

from __future__ import annotations

from typing import Any, TypeVar

import faust


class _Record(faust.Record, serializer="json", include_metadata=False, abstract=True):
    """Base of every contract record: JSON, no faust metadata on the wire."""


class CandidateTurn(_Record):
    """A generated message offered for admission."""

    schema_version: int
    turn_id: str
    conversation_id: str
    index: int  # position of the message in its conversation, from 0
    role: str  # "user" | "assistant"
    text: str
    source: str = "selfchat"
    producer_id: str = ""
    generator: str = ""
    attempt: int = 0  # 0 for the first try at this position, then 1, 2, ...
    created_at: float = 0.0
    # For an assistant turn: the user turn it answers, which the optional LLM judge
    # reads as the instruction. "" when unknown (such a turn is not judged).
    prompt: str = ""


class ScoredTurn(_Record):
    """A candidate with its embedding and quality score (internal topic)."""

    schema_version: int
    candidate: CandidateTurn
    precheck: str  # "" when the text may be admitted, else a rejection reason
    embedding: list[float]
    nll: float
    tokens: int
    embedder: str
    scorer: str
    nll_threshold: float
    stage_s: dict[str, float] | None = None  # this turn's share of each stage's time
    origin_partition: int = -1
    origin_offset: int = -1
    scored_at: float = 0.0
    # The optional LLM judge (judge.*): judged is True when it rated this turn;
    # judge_score is the parsed 0-5 score, None when not judged or unreadable.
    judged: bool = False
    judge_score: float | None = None
    judge_threshold: float = 0.0
    judge_on_unparsed: str = "reject"
    judge: str = ""  # the judge generator's id
    judge_output: str = ""  # the start of the judge's raw output, for audit
    # admission.nll_early_stop: scoring stopped once the turn was certainly at or over
    # the threshold, so nll is a lower bound of its NLL (the decision is exact).
    nll_lower_bound: bool = False


class Decision(_Record):
    """The admission decision for one candidate turn."""

    schema_version: int
    turn_id: str
    conversation_id: str
    index: int
    accepted: bool
    reason: str
    neighbour_id: str  # turn id (or seed id) of the nearest stored message, "" if none
    similarity: float  # cosine with that neighbour, 0.0 if none
    nll: float
    tokens: int
    embedder: str
    scorer: str
    similarity_threshold: float
    nll_threshold: float
    replayed: bool = False  # True when the turn was decided before: this repeats that decision
    decided_at: float = 0.0
    stage_s: dict[str, float] | None = None  # seconds per stage: embed, score, judge, admit
    # The optional LLM judge: its 0-5 score (None when the turn was not judged or its
    # output was unreadable), the threshold in force and the judge's id (None and ""
    # when the turn was not judged).
    judge_score: float | None = None
    judge_threshold: float | None = None
    judge: str = ""
    # The candidate's source (selfchat, fauno, ...): NLL by corpus in metrics and reports.
    source: str = ""
    nll_lower_bound: bool = False  # nll is a lower bound (admission.nll_early_stop)


class AcceptedTurn(_Record):
    """One message of an accepted conversation, with its admission metadata."""

    turn_id: str
    role: str
    text: str
    nll: float
    similarity: float
    neighbour_id: str
    embedder: str
    scorer: str
    judge_score: float | None = None  # the LLM judge's 0-5 score, None when not judged


class AcceptedConversation(_Record):
    """A finished conversation: every message accepted, in order."""

    schema_version: int
    conversation_id: str
    source: str
    turns: list[AcceptedTurn]
    target_length: int
    truncated: bool = False
    producer_id: str = ""
    generator: str = ""
    finished_at: float = 0.0


class DeadLetter(_Record):
    """An event that could not be decoded, validated or processed."""

    schema_version: int
    origin_topic: str
    origin_partition: int
    origin_offset: int
    key: str | None  # the original key, decoded as UTF-8 with replacement
    value: str | None  # the original bytes as text (UTF-8 with replacement), None for null
    error: str
    error_type: str
    stage: str  # "decode" | "score" | "admit" | "producer"
    at: float = 0.0


class SnapshotPublished(_Record):
    """A fine-tuning snapshot is complete on disk (its manifest holds the details)."""

    schema_version: int
    snapshot_id: str
    parent: str  # "" when trained from the base model
    base_model: str
    path: str
    conversations: int
    created_at: float = 0.0


class EvaluationPublished(_Record):
    """One evaluation task's results for a snapshot (or "base", the base model)."""

    schema_version: int
    model_id: str
    task: str
    results: dict[str, Any]
    path: str  # the results file, next to its per-item predictions
    evaluated_at: float = 0.0


class BuildPublished(_Record):
    """A GGUF build of a snapshot and its quality gate (published only if it passed)."""

    schema_version: int
    snapshot_id: str
    quant: str  # "F16", "Q8_0", "Q4_K_M", ...
    path: str
    size_bytes: int
    gate: dict[str, Any]
    published: bool
    built_at: float = 0.0


R = TypeVar("R", bound=_Record)
