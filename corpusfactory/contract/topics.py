"""The contract's topic names (each prefixed by ``kafka.topic_prefix``) and its schema version."""

from __future__ import annotations

SCHEMA_VERSION = 1

CANDIDATES = "turns.candidates"
SCORED = "turns.scored"
DECISIONS = "turns.decisions"
ACCEPTED = "corpus.accepted"
DEADLETTER = "turns.deadletter"
SNAPSHOTS = "models.snapshots"
EVALUATIONS = "models.evaluations"
BUILDS = "models.builds"
ALL_TOPICS = (
    CANDIDATES, SCORED, DECISIONS, ACCEPTED, DEADLETTER, SNAPSHOTS, EVALUATIONS, BUILDS,
)  # fmt: skip
# Low-volume topics whose order matters more than their throughput.
SINGLE_PARTITION_TOPICS = (SCORED, SNAPSHOTS, EVALUATIONS, BUILDS)
