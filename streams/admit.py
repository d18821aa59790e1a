"""The ``admit_turns`` agent: the single writer of the vector index.

It reads ``turns.scored`` (one partition, so one admitter decides at a time),
looks up each turn's nearest stored neighbour in Milvus, decides the batch in
order with ``streams.decisions.decide_batch`` (the LLM judge's verdict, when the
scorer ran it, is applied last), upserts the accepted vectors
under keys derived from the turn ids, and only then sends the decisions. A
replayed or redelivered turn finds its own key and is answered again without a
second vector (I2, I4).

If the index is unreachable the batch is retried with back-off and not acked:
no turn is ever decided without its similarity check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from corpusfactory import contract
from corpusfactory.contract import ContractError, Decision, ScoredTurn, encode
from corpusfactory.errors import VectorIndexError
from corpusfactory.index import KIND_EVAL, KIND_SEED, KIND_TURN, VectorIndex
from corpusfactory.settings import Settings
from streams.decisions import Candidate, Nearest, decide_batch

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0


def seed_index(settings: Settings, index: VectorIndex | None = None) -> VectorIndex:
    """Embed the seed messages and upsert them (idempotent); returns the open index."""
    from corpusfactory.embedder import Embedder
    from corpusfactory.seeds import load_seeds, seed_messages

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


def load_reserved(settings: Settings, index: VectorIndex) -> VectorIndex:
    """Embed the evaluation items into the reserved collection (idempotent)."""
    from corpusfactory.embedder import Embedder
    from training.evaluation.items import evaluation_items

    items = evaluation_items(settings)
    refs = [r for r, _ in items]
    present: set[str] = set()
    for start in range(0, len(refs), 1000):
        present |= index.existing(refs[start : start + 1000], reserved=True)
    missing = [i for i, r in enumerate(refs) if r not in present]
    if missing:
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


@dataclass
class Admitter:
    settings: Settings
    index: VectorIndex | None = None

    def ensure_index(self, dim: int) -> VectorIndex:
        if self.index is None:
            self.index = VectorIndex.from_settings(self.settings, dim)
        return self.index

    def admit(self, scored: list[ScoredTurn]) -> list[Decision]:
        """Blocking: search, decide in order, write vectors and the log, build decisions.

        A turn decided before (found in the decision log) gets that decision back,
        marked ``replayed``. Writes go vectors first, then the log, then the caller
        sends the decisions: a crash in between is repaired on redelivery (a vector
        without a log row still reads as accepted through ``existing``).
        """
        t0 = time.perf_counter()
        dims = {len(s.embedding) for s in scored if s.embedding}
        if len(dims) > 1:
            raise VectorIndexError(f"embeddings of different sizes in one batch: {sorted(dims)}")
        if dims:
            self.ensure_index(dims.pop())
        refs = [s.candidate.turn_id for s in scored]
        prior = self.index.prior_decisions(refs) if self.index else {}
        fresh = [i for i, r in enumerate(refs) if r not in prior]
        cands = [
            Candidate(
                ref=refs[i],
                vector=np.asarray(scored[i].embedding, dtype=np.float32),
                nll=scored[i].nll,
                precheck=scored[i].precheck,
                nll_threshold=scored[i].nll_threshold,
                judged=scored[i].judged,
                judge_score=scored[i].judge_score,
                judge_threshold=scored[i].judge_threshold,
                judge_on_unparsed="accept" if scored[i].judge_on_unparsed == "accept" else "reject",
            )
            for i in fresh
        ]
        live = [j for j, c in enumerate(cands) if not c.precheck]
        nearest: list[Nearest | None] = [None] * len(cands)
        reserved: list[Nearest | None] = [None] * len(cands)
        already: set[str] = set()
        adm = self.settings.admission
        if live:
            assert self.index is not None
            live_refs = [cands[j].ref for j in live]
            vecs = np.stack([cands[j].vector for j in live])
            found = self.index.search(vecs, exclude=live_refs)
            for j, n in zip(live, found, strict=True):
                nearest[j] = Nearest(n.ref, n.similarity) if n else None
            if adm.decontaminate:
                for j, n in zip(live, self.index.search(vecs, reserved=True), strict=True):
                    reserved[j] = Nearest(n.ref, n.similarity) if n else None
            already = self.index.existing(live_refs)
        sim_threshold = adm.similarity_threshold
        verdicts = decide_batch(
            cands, nearest, already, sim_threshold, reserved, adm.contamination_threshold
        )
        # replayed = accepted before (in the index, or earlier in this batch): no write
        new = [
            (c.ref, c.vector)
            for c, v in zip(cands, verdicts, strict=True)
            if v.accepted and not v.replayed
        ]
        if new:
            assert self.index is not None
            self.index.upsert([r for r, _ in new], np.stack([v for _, v in new]), KIND_TURN)
        records: dict[str, dict[str, Any]] = dict(prior)
        for i, v in zip(fresh, verdicts, strict=True):
            s = scored[i]
            records[refs[i]] = {
                "accepted": v.accepted,
                "reason": v.reason,
                "neighbour_id": v.neighbour,
                "similarity": v.similarity,
                "nll": s.nll,
                "tokens": s.tokens,
                "nll_threshold": s.nll_threshold,
                "similarity_threshold": sim_threshold,
                "replayed": v.replayed,
                "judge_score": s.judge_score,
                "judge_threshold": s.judge_threshold if s.judged else None,
                "judge": s.judge if s.judged else "",
            }
        logged = {refs[i]: records[refs[i]] for i in fresh}
        if self.index is not None:
            self.index.log_decisions(logged)
        now = time.time()
        admit_s = (time.perf_counter() - t0) / len(scored)
        return [
            Decision(
                schema_version=contract.SCHEMA_VERSION,
                turn_id=s.candidate.turn_id,
                conversation_id=s.candidate.conversation_id,
                index=s.candidate.index,
                accepted=rec["accepted"],
                reason=rec["reason"],
                neighbour_id=rec["neighbour_id"],
                similarity=rec["similarity"],
                nll=rec["nll"],
                tokens=rec["tokens"],
                embedder=s.embedder,
                scorer=s.scorer,
                similarity_threshold=rec["similarity_threshold"],
                nll_threshold=rec["nll_threshold"],
                replayed=ref in prior or bool(rec["replayed"]),
                decided_at=now,
                stage_s={**(s.stage_s or {}), "admit": admit_s},
                # A log row written before the judge existed has none of these.
                judge_score=rec.get("judge_score"),
                judge_threshold=rec.get("judge_threshold"),
                judge=rec.get("judge", ""),
                source=s.candidate.source,
            )
            for s, ref in zip(scored, refs, strict=True)
            for rec in (records[ref],)
        ]


def register(ctx: Any) -> None:
    settings: Settings = ctx.settings
    adm = settings.admission
    admitter = Admitter(settings)

    @ctx.app.agent(ctx.scored, name="admit_turns", concurrency=1)
    async def admit_turns(stream: Any) -> None:
        if settings.index.seed_on_start:
            admitter.index = await _retry(ctx, seed_index, settings)
        if adm.decontaminate:
            if admitter.index is None:
                from corpusfactory.embedder import Embedder

                dim = Embedder(settings.models.embedder, device=settings.models.device).dim
                admitter.ensure_index(dim)
            await _retry(ctx, load_reserved, settings, admitter.index)
        if admitter.index is not None:
            ctx.metrics.set_index_counts(await ctx.run_blocking(_index_counts, admitter.index))
        log.info("admitter ready: index %s", settings.milvus.uri or "Milvus Lite")
        async for events in stream.take_events(adm.admit_batch_size, within=adm.batch_window_s):
            await _admit_events(ctx, admitter, events)


def _index_counts(index: VectorIndex) -> dict[str, int]:
    return {
        KIND_SEED: index.count(KIND_SEED),
        KIND_TURN: index.count(KIND_TURN),
        KIND_EVAL: index.count(KIND_EVAL, reserved=True),
    }


async def _retry(ctx: Any, fn: Any, *args: Any) -> Any:
    """Run fn in the inference thread until it stops raising VectorIndexError."""
    delay = 0.5
    while True:
        try:
            return await ctx.run_blocking(fn, *args)
        except VectorIndexError as exc:
            log.error("vector index unavailable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


async def _admit_events(ctx: Any, admitter: Admitter, events: list[Any]) -> None:
    scored: list[tuple[Any, ScoredTurn]] = []
    for event in events:
        try:
            scored.append((event, contract.decode_scored(event.message.value)))
        except ContractError as exc:
            await ctx.dead_letter(event, exc, "admit")
    if not scored:
        return
    try:
        decisions = await _retry(ctx, admitter.admit, [s for _, s in scored])
        decided = list(zip(scored, decisions, strict=True))
    except Exception as exc:
        # Not an index outage (that is retried above) but bad data or a bug: decide
        # turn by turn so one bad turn goes to the dead-letter topic and not its batch.
        log.exception("batch admission failed (%s); retrying turn by turn", exc)
        decided = []
        for pair in scored:
            try:
                decided.append((pair, (await _retry(ctx, admitter.admit, [pair[1]]))[0]))
            except Exception as exc1:
                await ctx.dead_letter(pair[0], exc1, "admit")
    for (event, _), d in decided:
        await ctx.decisions.send(key=event.message.key, value=encode(d))
    decisions = [d for _, d in decided]
    ctx.metrics.observe(decisions)
    # Only first acceptances add a vector (a replay finds its own key).
    added = sum(d.accepted and not d.replayed for d in decisions)
    if added:
        ctx.metrics.index_vectors.labels(KIND_TURN).inc(added)
