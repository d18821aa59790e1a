"""The ``admit_turns`` agent: the single writer of the vector index.

It reads ``turns.scored`` (one partition, so one admitter decides at a time),
looks up each turn's nearest stored neighbour in Milvus, decides the batch in
order with ``streams.decisions.decide_batch`` (the LLM judge's verdict, when the
scorer ran it, is applied last), upserts the accepted vectors
under keys derived from the turn ids, and only then sends the decisions. A
replayed or redelivered turn finds its own key and is answered again without a
second vector (I2, I4).

Failures come in two kinds (``corpusfactory.errors``). If the index is
unavailable the batch is retried with back-off (capped at
``admission.retry_max_s``, one log line a try) and not acked: no turn is ever
decided without its similarity check. A turn that can never be decided (its id
was decided for another text, the index refuses its record, its event does not
decode) is dead-lettered alone, with its origin and error, and the partition
moves on: no single event can stop the admitter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from corpusfactory import contract
from corpusfactory.contract import Decision, DecisionLogRow, ScoredTurn, encode
from corpusfactory.engines.index import KIND_EVAL, KIND_SEED, KIND_TURN, VectorIndex, check_ref
from corpusfactory.errors import (
    ConflictError,
    CorpusFactoryError,
    IndexRecordError,
    UnavailableError,
)
from corpusfactory.redact import redact_uri
from corpusfactory.settings import Settings
from streams.decisions import Candidate, Neighbour, decide_batch

log = logging.getLogger(__name__)


def seed_index(
    settings: Settings, index: VectorIndex | None = None, embedder: Any = None
) -> VectorIndex:
    """Embed the seed messages and upsert them (idempotent); returns the open index."""
    from corpusfactory.engines.embedder import Embedder
    from corpusfactory.seeds import load_seeds, seed_messages

    if embedder is None:
        embedder = Embedder(settings.models.embedder, device=settings.models.device)
    if index is None:
        index = VectorIndex.from_settings(settings, embedder.dim)
    msgs = seed_messages(load_seeds(settings.producer.seed_file, settings.producer.seed_format))
    refs = [f"seed:{mid}" for mid, _ in msgs]
    present = index.existing(refs)
    missing = [i for i, r in enumerate(refs) if r not in present]
    if missing:
        vecs = embedder.encode([msgs[i][1] for i in missing])
        index.upsert([refs[i] for i in missing], vecs, KIND_SEED)
    log.info("index holds %d seed vectors (%d added)", index.count(KIND_SEED), len(missing))
    return index


def load_reserved(settings: Settings, index: VectorIndex, embedder: Any = None) -> VectorIndex:
    """Embed the evaluation items into the reserved collection (idempotent)."""
    from corpusfactory.engines.embedder import Embedder
    from training.evaluation.items import evaluation_items

    items = evaluation_items(settings)
    refs = [r for r, _ in items]
    present: set[str] = set()
    for start in range(0, len(refs), 1000):
        present |= index.existing(refs[start : start + 1000], reserved=True)
    missing = [i for i, r in enumerate(refs) if r not in present]
    if missing:
        if embedder is None:
            embedder = Embedder(settings.models.embedder, device=settings.models.device)
        for start in range(0, len(missing), 512):
            chunk = missing[start : start + 512]
            vecs = embedder.encode([items[i][1] for i in chunk])
            index.upsert([refs[i] for i in chunk], vecs, KIND_EVAL, reserved=True)
    log.info(
        "reserved part holds %d evaluation items (%d added)",
        index.count(KIND_EVAL, reserved=True),
        len(missing),
    )
    return index


def text_digest(text: str) -> str:
    """What the decision log keeps of a turn's text: enough to tell another text."""
    return xxhash.xxh64_hexdigest(text.encode("utf-8", errors="surrogatepass"))


@dataclass
class Admitter:
    settings: Settings
    index: VectorIndex | None = None
    _embedder: Any = None

    def embedder(self) -> Any:
        """The embedder for seeds and evaluation items, loaded once, in this thread."""
        if self._embedder is None:
            from corpusfactory.engines.embedder import Embedder

            m = self.settings.models
            self._embedder = Embedder(m.embedder, device=m.device)
        return self._embedder

    def ensure_index(self, dim: int) -> VectorIndex:
        if self.index is None:
            self.index = VectorIndex.from_settings(self.settings, dim)
        return self.index

    def prepare(self) -> dict[str, int]:
        """Blocking start-up: seeds and evaluation items in the index, with one embedder.

        Idempotent, so it is simply run again while the index is unavailable.
        Returns the index's counts by kind (for the metrics).
        """
        if self.settings.index.seed_on_start:
            self.index = seed_index(self.settings, self.index, self.embedder())
        if self.settings.admission.decontaminate:
            self.ensure_index(self.embedder().dim)
            assert self.index is not None
            load_reserved(self.settings, self.index, self.embedder())
        return _index_counts(self.index) if self.index is not None else {}

    def admit(self, scored: list[ScoredTurn]) -> list[Decision | CorpusFactoryError]:
        """Blocking: search, decide in order, write vectors and the log, build decisions.

        Returns one outcome per turn, in order: its Decision, or the permanent error
        that keeps it from ever being decided (``ConflictError``: its turn id was
        decided for another text; ``IndexRecordError``: the index cannot hold it),
        which the caller dead-letters. Nothing of such a turn is written.

        A turn decided before (found in the decision log) gets that decision back,
        marked ``replayed``; so does the second copy of a turn sent twice in one
        batch (the first copy is its first decision). Writes go vectors first,
        then the log, then the caller sends the decisions: a crash in between is
        repaired on redelivery (a vector without a log row still reads as accepted
        through ``existing``). An unavailable index raises
        ``IndexUnavailableError`` before anything is decided.
        """
        t0 = time.perf_counter()
        n = len(scored)
        out: list[Decision | CorpusFactoryError | None] = [None] * n
        refs = [s.candidate.turn_id for s in scored]
        digests = [text_digest(s.candidate.text) for s in scored]
        dims = [len(s.embedding) for s in scored]
        want = self.index.dim if self.index is not None else next((d for d in dims if d), 0)
        if want:
            self.ensure_index(want)
        for i, ref in enumerate(refs):
            try:
                check_ref(ref)
            except IndexRecordError as exc:
                out[i] = exc
                continue
            if dims[i] and dims[i] != want:
                out[i] = IndexRecordError(
                    f"turn {ref[:60]!r}: embedding of dimension {dims[i]}, the index has {want}"
                )
        live = [i for i in range(n) if out[i] is None]
        prior = self.index.prior_decisions(sorted({refs[i] for i in live})) if self.index else {}
        first_at: dict[str, int] = {}
        fresh: list[int] = []  # first sight of a turn: decided now
        repeats: dict[int, int] = {}  # a second copy in this batch -> the first copy
        for i in live:
            ref = refs[i]
            seen = prior[ref].text_sha if ref in prior else None
            if ref in first_at:
                seen = digests[first_at[ref]]
            if seen is not None and seen != digests[i]:
                out[i] = ConflictError(
                    f"turn id {ref[:60]!r} was already decided for another text "
                    f"(xxh64 {seen}, this one {digests[i]}); a turn id names one text"
                )
            elif ref in first_at:
                repeats[i] = first_at[ref]
            elif ref not in prior:
                first_at[ref] = i
                fresh.append(i)
        cands = [Candidate.from_scored(refs[i], scored[i]) for i in fresh]
        live_c = [j for j, c in enumerate(cands) if not c.precheck]
        nearest: list[Neighbour | None] = [None] * len(cands)
        reserved: list[Neighbour | None] = [None] * len(cands)
        already: set[str] = set()
        adm = self.settings.admission
        if live_c:
            assert self.index is not None
            live_refs = [cands[j].ref for j in live_c]
            vecs = np.stack([cands[j].vector for j in live_c])
            found = self.index.search(vecs, exclude=live_refs)
            for j, nb in zip(live_c, found, strict=True):
                nearest[j] = nb
            if adm.decontaminate:
                for j, nb in zip(live_c, self.index.search(vecs, reserved=True), strict=True):
                    reserved[j] = nb
            already = self.index.existing(live_refs)
        sim_threshold = adm.similarity_threshold
        verdicts = decide_batch(
            cands, nearest, already, sim_threshold, reserved, adm.contamination_threshold
        )
        records: dict[str, DecisionLogRow] = {}
        for i, v in zip(fresh, verdicts, strict=True):
            s = scored[i]
            records[refs[i]] = DecisionLogRow(
                accepted=v.accepted,
                reason=v.reason,
                neighbour_id=v.neighbour,
                similarity=v.similarity,
                nll=s.nll,
                tokens=s.tokens,
                nll_threshold=s.nll_threshold,
                similarity_threshold=sim_threshold,
                replayed=v.replayed,
                judge_score=s.judge_score,
                judge_threshold=s.judge_threshold if s.judged else None,
                judge=s.judge if s.judged else "",
                text_sha=digests[i],
                nll_lower_bound=s.nll_lower_bound,
            )
        if self.index is not None:
            self.index.check_log_rows(records)  # before any write: all or nothing
        # replayed = accepted before (a vector without a log row): no second write
        new = [
            (c.ref, c.vector)
            for c, v in zip(cands, verdicts, strict=True)
            if v.accepted and not v.replayed
        ]
        if new:
            assert self.index is not None
            self.index.upsert([r for r, _ in new], np.stack([v for _, v in new]), KIND_TURN)
        if self.index is not None:
            self.index.log_decisions(records)
        now = time.time()
        admit_s = (time.perf_counter() - t0) / max(n, 1)
        for i, s in enumerate(scored):
            if out[i] is not None:
                continue
            ref = refs[i]
            if i in repeats or ref in prior:
                rec, replayed = (records[ref] if i in repeats else prior[ref]), True
            else:
                rec = records[ref]
                replayed = rec.replayed
            out[i] = Decision(
                schema_version=contract.SCHEMA_VERSION,
                turn_id=s.candidate.turn_id,
                conversation_id=s.candidate.conversation_id,
                index=s.candidate.index,
                accepted=rec.accepted,
                reason=rec.reason,
                neighbour_id=rec.neighbour_id,
                similarity=rec.similarity,
                nll=rec.nll,
                tokens=rec.tokens,
                embedder=s.embedder,
                scorer=s.scorer,
                similarity_threshold=rec.similarity_threshold,
                nll_threshold=rec.nll_threshold,
                replayed=replayed,
                decided_at=now,
                stage_s={**(s.stage_s or {}), "admit": admit_s},
                judge_score=rec.judge_score,
                judge_threshold=rec.judge_threshold,
                judge=rec.judge,
                nll_lower_bound=rec.nll_lower_bound,
                source=s.candidate.source,
            )
        done = [o for o in out if o is not None]
        if len(done) != n:  # pragma: no cover - every branch above sets an outcome
            raise RuntimeError("admission left a turn without an outcome")
        return done


def register(ctx: Any, admitter: Admitter | None = None) -> None:
    """Register ``admit_turns`` on ``ctx.app``; it decides with ``admitter`` (by default
    a new one on ``ctx.settings``, which opens the index on its first batch)."""
    settings: Settings = ctx.settings
    adm = settings.admission
    if admitter is None:
        admitter = Admitter(settings)

    @ctx.app.agent(ctx.scored, name="admit_turns", concurrency=1)
    async def admit_turns(stream: Any) -> None:
        # Seeds and evaluation items: models loaded in the inference thread, never on
        # the event loop; retried (one line a try) while the index is unavailable.
        counts = await _retry(ctx, admitter.prepare, what="index start-up")
        if counts:
            ctx.metrics.set_index_counts(counts)
        log.info("admitter ready: index %s", redact_uri(settings.milvus.uri or "Milvus Lite"))
        async for events in stream.take_events(adm.admit_batch_size, within=adm.batch_window_s):
            await _admit_events(ctx, admitter, events)


def _index_counts(index: VectorIndex) -> dict[str, int]:
    return {
        KIND_SEED: index.count(KIND_SEED),
        KIND_TURN: index.count(KIND_TURN),
        KIND_EVAL: index.count(KIND_EVAL, reserved=True),
    }


async def _retry(ctx: Any, fn: Any, *args: Any, what: str = "admission") -> Any:
    """Run fn in the inference thread until it stops raising UnavailableError.

    Back-off doubles from 0.5 s up to ``admission.retry_max_s``; each failed try
    logs one line (no traceback). A permanent error is raised at once.
    """
    delay = 0.5
    cap = ctx.settings.admission.retry_max_s
    tries = 0
    while True:
        try:
            result = await ctx.run_blocking(fn, *args)
        except UnavailableError as exc:
            tries += 1
            log.error(
                "%s: vector index unavailable (try %d): %s; retrying in %.1fs",
                what,
                tries,
                exc,
                delay,
            )
            ctx.metrics.retries.inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
            continue
        if tries:
            log.info("%s: vector index back after %d failed tries", what, tries)
        return result


async def _admit_events(ctx: Any, admitter: Admitter, events: list[Any]) -> None:
    """Decide a batch; any event that cannot be decided is dead-lettered alone."""
    scored: list[tuple[Any, ScoredTurn]] = []
    adm = ctx.settings.admission
    for event in events:
        try:
            turn = contract.decode_scored(
                event.message.value, adm.max_event_chars, 4 * adm.max_event_bytes
            )
        except Exception as exc:  # a bad event, whatever broke: dead-letter it alone
            await ctx.dead_letter(event, exc, "admit")
            continue
        scored.append((event, turn))
    if not scored:
        return
    outcomes: list[tuple[Any, Decision | BaseException]] = []
    try:
        decided = await _retry(ctx, admitter.admit, [s for _, s in scored])
        outcomes = list(zip([e for e, _ in scored], decided, strict=True))
    except Exception as exc:
        # Not an outage (that is retried above) but a record the index refuses or a
        # bug: decide turn by turn so one bad turn is dead-lettered and not its batch.
        log.error("batch admission failed (%s: %s); deciding turn by turn", type(exc).__name__, exc)
        for event, turn in scored:
            try:
                outcomes.append((event, (await _retry(ctx, admitter.admit, [turn]))[0]))
            except Exception as exc1:
                outcomes.append((event, exc1))
    turns = {id(e): t for e, t in scored}
    candidates = ctx.settings.topic(contract.CANDIDATES)
    decisions: list[Decision] = []
    for event, outcome in outcomes:
        if isinstance(outcome, BaseException):
            # Point the dead letter at the candidate that a producer sent.
            turn = turns[id(event)]
            stage = "conflict" if isinstance(outcome, ConflictError) else "admit"
            origin = (candidates, turn.origin_partition, turn.origin_offset)
            try:
                value = encode(turn.candidate)
            except Exception:  # a candidate that does not encode: keep the scored bytes
                value = None
            await ctx.dead_letter(event, outcome, stage, origin, value)
            continue
        if await ctx.forward(ctx.decisions, event, outcome, "admit"):
            decisions.append(outcome)
    ctx.metrics.observe(decisions)
    # Only first acceptances add a vector (a replay finds its own key).
    added = sum(d.accepted and not d.replayed for d in decisions)
    if added:
        ctx.metrics.index_vectors.labels(KIND_TURN).inc(added)
