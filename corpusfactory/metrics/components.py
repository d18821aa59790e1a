"""The metrics of each long-running component: scorer, admitter, producer, writer,
trainer, evaluator and builder, each a ``ComponentMetrics`` with its own series."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from corpusfactory import contract
from corpusfactory.metrics.base import ComponentMetrics
from corpusfactory.metrics.constants import (
    COSINE_BUCKETS,
    JUDGE_BUCKETS,
    NLL_BUCKETS,
)

if TYPE_CHECKING:
    from corpusfactory.contract import Decision, ScoredTurn


class ScorerMetrics(ComponentMetrics):
    component = "scorer"

    def __init__(self) -> None:
        super().__init__()
        self.stage = self._stages()
        self.batch = self._batches()
        self.deadletter = self._counter(
            "deadletter", "Events sent to the dead-letter topic.", ["stage"]
        )
        for stage in ("decode", "score"):
            self.deadletter.labels(stage)

    def observe_batch(self, scored: Sequence[ScoredTurn]) -> None:
        self.batch.labels("score").observe(len(scored))
        for s in scored:
            for stage, seconds in (s.stage_s or {}).items():
                self.stage.labels(stage).observe(seconds)


class AdmitterMetrics(ComponentMetrics):
    component = "admitter"

    def __init__(self, acceptance_window: int = 500) -> None:
        super().__init__()
        self.decisions = self._counter(
            "decisions", "First decisions of turns, by reason.", ["reason"]
        )
        for reason in contract.Reason:
            self.decisions.labels(reason)
        self.replayed = self._counter(
            "decisions_replayed", "Decisions repeated for turns decided before."
        )
        self.acceptance = self._gauge(
            "acceptance_rate", "Accepted share of the most recent first decisions."
        )
        self._window: deque[bool] = deque(maxlen=acceptance_window)
        self.nll = self._histogram(
            "nll", "MLM NLL of decided, scored turns.", NLL_BUCKETS, ["source", "accepted"]
        )
        self.cosine = self._histogram(
            "neighbour_cosine",
            "Cosine with the nearest stored vector of decided, searched turns.",
            COSINE_BUCKETS,
        )
        self.judge = self._histogram(
            "judge_score", "LLM-judge scores of judged turns.", JUDGE_BUCKETS
        )
        self.stage = self._stages()
        self.batch = self._batches()
        self.index_vectors = self._gauge("index_vectors", "Vectors in the index.", ["kind"])
        self.deadletter = self._counter(
            "deadletter", "Events sent to the dead-letter topic.", ["stage"]
        )
        for stage in ("admit", "conflict"):  # conflict: a turn id decided for another text
            self.deadletter.labels(stage)
        self.retries = self._counter(
            "index_retries", "Tries of the vector index that found it unavailable."
        )

    def observe(self, decisions: Sequence[Decision]) -> None:
        """Count a batch of decisions (replays apart) and its distributions."""
        if decisions:
            self.batch.labels("admit").observe(len(decisions))
        for d in decisions:
            self.stage.labels("admit").observe((d.stage_s or {}).get("admit", 0.0))
            if d.replayed:
                self.replayed.inc()
                continue
            self.decisions.labels(d.reason).inc()
            self._window.append(d.accepted)
            if d.tokens > 0 and math.isfinite(d.nll) and d.nll >= 0:
                self.nll.labels(d.source or "unknown", "true" if d.accepted else "false").observe(
                    d.nll
                )
            if d.neighbour_id:
                self.cosine.observe(d.similarity)
            if d.judge_score is not None:
                self.judge.observe(d.judge_score)
        if self._window:
            self.acceptance.set(sum(self._window) / len(self._window))

    def set_index_counts(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.index_vectors.labels(kind).set(n)


class ProducerMetrics(ComponentMetrics):
    component = "producer"

    def __init__(self) -> None:
        super().__init__()
        self.generated = self._counter(
            "candidates_generated", "Candidate turns generated and sent.", ["producer", "model"]
        )
        self.empty = self._counter(
            "generations_empty", "Generations with no usable text.", ["producer"]
        )
        self.resent = self._counter(
            "candidates_resent", "Candidates sent again under the same turn id.", ["producer"]
        )
        self.conversations = self._counter(
            "conversations", "Conversations closed, by status.", ["producer", "status"]
        )
        self.active = self._gauge(
            "conversations_active", "Conversations in progress.", ["producer"]
        )
        self.stage = self._stages()
        self.batch = self._batches()

    def start(self, producer: str, model: str) -> None:
        """Export every series of this producer from the start, at 0."""
        self.generated.labels(producer, model)
        self.empty.labels(producer)
        self.resent.labels(producer)
        for status in ("finished", "truncated"):
            self.conversations.labels(producer, status)
        self.active.labels(producer).set(0)


class WriterMetrics(ComponentMetrics):
    component = "writer"

    def __init__(self) -> None:
        super().__init__()
        self.conversations = self._gauge(
            "corpus_conversations", "Conversations in the corpus store.", ["source", "truncated"]
        )
        self.messages = self._gauge("corpus_messages", "Messages in the corpus store.")
        self.decisions = self._gauge("corpus_decisions", "Decision records in the store.")
        self.undecodable = self._counter(
            "undecodable", "Events the corpus writer could not decode."
        )

    def set_counts(
        self, by_source: dict[tuple[str, bool], int], messages: int, decisions: int
    ) -> None:
        for (source, truncated), n in by_source.items():
            self.conversations.labels(source, "true" if truncated else "false").set(n)
        self.messages.set(messages)
        self.decisions.set(decisions)


class TrainerMetrics(ComponentMetrics):
    component = "trainer"

    def __init__(self) -> None:
        super().__init__()
        self.snapshots = self._counter("snapshots", "Snapshots published by this process.")
        self.loss = self._gauge(
            "snapshot_loss", "Training loss of each snapshot.", ["snapshot", "point"]
        )
        self.tokens_per_s = self._gauge(
            "snapshot_tokens_per_second", "Training tokens/s of each snapshot.", ["snapshot"]
        )
        self.conversations = self._gauge(
            "snapshot_conversations", "Conversations each snapshot trained on.", ["snapshot"]
        )
        self.pending = self._gauge(
            "training_pending_conversations", "Conversations waiting for the trigger."
        )
        self.failures = self._counter("training_failures", "Training runs that failed.")

    def observe_snapshot(self, manifest: dict[str, Any]) -> None:
        sid = str(manifest["id"])
        for point in ("first", "final"):
            value = manifest.get(f"{point}_loss")
            if value is not None:
                self.loss.labels(sid, point).set(float(value))
        if manifest.get("tokens_per_s") is not None:
            self.tokens_per_s.labels(sid).set(float(manifest["tokens_per_s"]))
        self.conversations.labels(sid).set(int(manifest.get("conversations", 0)))


class EvaluatorMetrics(ComponentMetrics):
    component = "evaluator"

    def __init__(self) -> None:
        super().__init__()
        self.score = self._gauge(
            "evaluation_score", "Evaluation figures per model.", ["model", "task", "metric"]
        )
        self.evaluations = self._counter("evaluations", "Models evaluated by this process.")
        self.finished = self._gauge(
            "evaluation_timestamp_seconds", "When a model's evaluation finished.", ["model"]
        )
        self.failures = self._counter(
            "evaluation_failures",
            "Evaluation tasks that failed (recorded, skipped until retried by hand).",
            ["task"],
        )

    def observe(self, model: str, results: dict[str, Any], counted: bool = True) -> None:
        """Every finite number in ``results`` (task -> figures), as task/metric series;
        ``counted=False`` for results stored by an earlier run."""
        for task, figures in results.items():
            if not isinstance(figures, dict):
                continue
            for metric, value in figures.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if math.isfinite(value):
                    self.score.labels(model, task, metric).set(float(value))
        if counted:
            self.evaluations.inc()
            self.finished.labels(model).set(time.time())


class BuilderMetrics(ComponentMetrics):
    component = "builder"
    FIGURES = ("kl_mean", "kl_p99", "top1_agreement", "ppl_delta_pct")
    FAILURE_REASONS = ("convert", "quantize", "gate")

    def __init__(self) -> None:
        super().__init__()
        self.gate = self._gauge(
            "build_gate", "Quality-gate figures of each build.", ["snapshot", "quant", "figure"]
        )
        self.passed = self._gauge(
            "build_gate_passed",
            "1 when the build is within its gate budgets.",
            ["snapshot", "quant"],
        )
        self.size = self._gauge("build_size_bytes", "GGUF file size.", ["snapshot", "quant"])
        self.builds = self._counter("builds", "Builds made by this process.", ["result"])
        for result in ("published", "held_back"):
            self.builds.labels(result)
        self.failures = self._counter(
            "build_failures",
            "Snapshots whose builds failed (recorded, skipped until retried by hand), "
            "by the step that failed.",
            ["reason"],
        )
        for reason in self.FAILURE_REASONS:
            self.failures.labels(reason)

    def observe_build(self, described: dict[str, Any], counted: bool = True) -> None:
        """One build as ``Build.describe()`` gives it."""
        snap, quant = str(described["snapshot"]), str(described["quant"])
        gate = described.get("gate") or {}
        for figure in self.FIGURES:
            value = gate.get(figure)
            if isinstance(value, int | float) and math.isfinite(value):
                self.gate.labels(snap, quant, figure).set(float(value))
        published = bool(described.get("published"))
        self.passed.labels(snap, quant).set(1 if published else 0)
        self.size.labels(snap, quant).set(int(described.get("size_bytes", 0)))
        if counted:
            self.builds.labels("published" if published else "held_back").inc()
