"""The names, version and histogram buckets every metrics module shares (the contract of
``docs/metrics.md``)."""

from __future__ import annotations

PREFIX = "corpusfactory"
COMPONENTS = ("scorer", "admitter", "producer", "writer", "trainer", "evaluator", "builder")
VERSION = "0.1.0"

# Per-turn stage times span a millisecond (admission) to tens of seconds (generation
# of a 7B model on a busy GPU, a round trip behind a backlog).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The paper's filter keeps NLL < 2 (an Italian BERT, modes about 0.8-1.0); the demo's
# tiny scorer sits near 6: fine steps below 4, coarser ones up to 12.
NLL_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4, 5, 6, 7, 8, 10, 12)
# Cosine: the reject line is 0.9 (contamination too), so 0.05 steps at the top.
COSINE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
JUDGE_BUCKETS = (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)
