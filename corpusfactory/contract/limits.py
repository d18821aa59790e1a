"""The bounds of the contract: allowed values and the maximum of every string field."""

from __future__ import annotations

ROLES = ("user", "assistant")
JUDGE_ON_UNPARSED = ("reject", "accept")

JUDGE_MAX_SCORE = 5.0
JUDGE_OUTPUT_CHARS = 500  # how much of the judge's raw output a scored turn keeps

# Bounds of the contract (see the docstring of corpusfactory.contract).
ID_MAX_BYTES = 256  # turn, conversation, neighbour, snapshot and model ids
NAME_MAX_BYTES = 256  # producer, generator, embedder, scorer, judge ids
SOURCE_MAX_BYTES = 64
MAX_JSON_DEPTH = 16  # the deepest record (a scored turn's candidate) needs 3
DEFAULT_MAX_EVENT_BYTES = 512 * 1024
DEFAULT_MAX_EVENT_CHARS = 20_000
ERROR_MAX_CHARS = 2000  # a dead letter's error message
DEAD_VALUE_MAX_BYTES = 64 * 1024  # how much of a bad event a dead letter keeps

# The maximum of every string field of every record: ("bytes", n) counts UTF-8
# bytes, ("chars", n) characters, ("text", None) the event's text limit
# (admission.max_event_chars). A test checks that no string field is missing.
_ID = ("bytes", ID_MAX_BYTES)
_NAME = ("bytes", NAME_MAX_BYTES)
_TEXT = ("text", None)
FIELD_LIMITS: dict[str, dict[str, tuple[str, int | None]]] = {
    "CandidateTurn": {
        "turn_id": _ID,
        "conversation_id": _ID,
        "role": ("bytes", 16),
        "text": _TEXT,
        "source": ("bytes", SOURCE_MAX_BYTES),
        "producer_id": _NAME,
        "generator": _NAME,
        "prompt": _TEXT,
    },
    "ScoredTurn": {
        "precheck": ("bytes", 32),
        "embedder": _NAME,
        "scorer": _NAME,
        "judge_on_unparsed": ("bytes", 16),
        "judge": _NAME,
        "judge_output": ("chars", JUDGE_OUTPUT_CHARS),
    },
    "Decision": {
        "turn_id": _ID,
        "conversation_id": _ID,
        "reason": ("bytes", 32),
        "neighbour_id": ("bytes", 2 * ID_MAX_BYTES),  # a turn id, or "seed:"/"eval:" + an id
        "embedder": _NAME,
        "scorer": _NAME,
        "judge": _NAME,
        "source": ("bytes", SOURCE_MAX_BYTES),
    },
    "AcceptedTurn": {
        "turn_id": _ID,
        "role": ("bytes", 16),
        "text": _TEXT,
        "neighbour_id": ("bytes", 2 * ID_MAX_BYTES),
        "embedder": _NAME,
        "scorer": _NAME,
    },
    "AcceptedConversation": {
        "conversation_id": _ID,
        "source": ("bytes", SOURCE_MAX_BYTES),
        "producer_id": _NAME,
        "generator": _NAME,
    },
    "DeadLetter": {
        "origin_topic": ("bytes", 249),  # Kafka's own limit on topic names
        "key": ("bytes", DEAD_VALUE_MAX_BYTES),
        "value": ("bytes", DEAD_VALUE_MAX_BYTES),
        "error": ("chars", ERROR_MAX_CHARS),
        "error_type": ("bytes", 128),
        "stage": ("bytes", 32),
    },
    "SnapshotPublished": {
        "snapshot_id": _ID,
        "parent": _ID,
        "base_model": ("bytes", 4096),
        "path": ("bytes", 4096),
    },
    "EvaluationPublished": {"model_id": _ID, "task": _NAME, "path": ("bytes", 4096)},
    "BuildPublished": {
        "snapshot_id": _ID,
        "quant": ("bytes", 32),
        "path": ("bytes", 4096),
    },
}
