"""The ``score_turns`` agent: candidates in, scored turns (or dead letters) out.

Each batch is decoded and validated; a bad event goes to ``turns.deadletter``
with its origin and error, and the partition keeps flowing. Valid turns are
pre-checked (empty, too long, language), then embedded and NLL-scored in the
inference thread, off the event loop. The agent never raises: Faust would ack
and drop the message if it did.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from corpusfactory import contract
from corpusfactory.contract import CandidateTurn, ContractError, ScoredTurn, encode
from corpusfactory.embedder import Embedder
from corpusfactory.language import LanguageCheck
from corpusfactory.models.demo import resolve_model
from corpusfactory.scoring.nll import MLMScorer, nll_percentile
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import Settings
from streams.decisions import TOO_LONG, precheck

log = logging.getLogger(__name__)

NOT_SCORED = -1.0  # nll on the wire for a turn rejected before scoring (JSON has no NaN)


@dataclass
class ScoringModels:
    embedder: Embedder
    scorer: MLMScorer
    nll_threshold: float
    language: LanguageCheck | None

    @classmethod
    def load(cls, settings: Settings) -> ScoringModels:
        adm = settings.admission
        models_dir = settings.models.models_dir
        scorer = MLMScorer(
            resolve_model(settings.models.scorer, models_dir),
            device=settings.models.device,
            max_tokens=adm.max_tokens,
            masked_batch_size=adm.masked_batch_size,
            granularity=adm.nll_granularity,
        )
        embedder = Embedder(settings.models.embedder, device=settings.models.device)
        threshold = adm.nll_threshold
        if adm.nll_threshold_percentile is not None:
            seeds = load_seeds(settings.producer.seed_file, settings.producer.seed_format)
            texts = [m.text for conv in seeds for m in conv.messages]
            threshold = nll_percentile(scorer, texts, adm.nll_threshold_percentile)
            log.info(
                "NLL threshold = p%.0f of %d seed messages = %.4f",
                adm.nll_threshold_percentile,
                len(texts),
                threshold,
            )
        language = LanguageCheck(adm.language, adm.language_min_chars) if adm.language else None
        return cls(embedder, scorer, threshold, language)

    def score(self, turns: list[CandidateTurn], settings: Settings) -> list[ScoredTurn]:
        """Blocking: pre-check, NLL-score and embed a batch."""
        adm = settings.admission
        texts = [t.text for t in turns]
        reasons = [
            precheck(
                text,
                max_chars=adm.max_chars,
                language_ok=self.language.ok(text) if self.language else True,
            )
            for text in texts
        ]
        todo = [i for i, r in enumerate(reasons) if not r]
        nll = [NOT_SCORED] * len(turns)
        tokens = [0] * len(turns)
        t0 = time.perf_counter()
        results = self.scorer.score([texts[i] for i in todo])
        t1 = time.perf_counter()
        for i, res in zip(todo, results, strict=True):
            tokens[i] = res.tokens
            if res.too_long:
                reasons[i] = TOO_LONG
            elif res.tokens == 0 or not math.isfinite(res.nll):
                reasons[i] = "empty"
            else:
                nll[i] = float(res.nll)
        keep = [i for i, r in enumerate(reasons) if not r]
        vectors = self.embedder.encode([texts[i] for i in keep])
        t2 = time.perf_counter()
        n = len(turns)
        stage_s = {"score": (t1 - t0) / n, "embed": (t2 - t1) / n}
        embedding: list[list[float]] = [[] for _ in turns]
        for i, v in zip(keep, vectors, strict=True):
            embedding[i] = [float(x) for x in v]
        now = time.time()
        return [
            ScoredTurn(
                schema_version=contract.SCHEMA_VERSION,
                candidate=t,
                precheck=reasons[i],
                embedding=embedding[i],
                nll=nll[i],
                tokens=tokens[i],
                embedder=self.embedder.id,
                scorer=self.scorer.id,
                nll_threshold=self.nll_threshold,
                stage_s=stage_s,
                scored_at=now,
            )
            for i, t in enumerate(turns)
        ]


def register(ctx: Any) -> None:
    settings: Settings = ctx.settings
    adm = settings.admission

    @ctx.app.agent(ctx.candidates, name="score_turns", concurrency=1)
    async def score_turns(stream: Any) -> None:
        models: ScoringModels = await ctx.run_blocking(ScoringModels.load, settings)
        log.info("scorer ready: embedder=%s scorer=%s", models.embedder.id, models.scorer.id)
        async for events in stream.take_events(adm.score_batch_size, within=adm.batch_window_s):
            await _score_events(ctx, models, events)


async def _score_events(ctx: Any, models: ScoringModels, events: list[Any]) -> None:
    settings: Settings = ctx.settings
    valid: list[tuple[Any, CandidateTurn]] = []
    for event in events:
        try:
            valid.append(
                (
                    event,
                    contract.decode_candidate(
                        event.message.value, settings.admission.max_event_chars
                    ),
                )
            )
        except ContractError as exc:
            await ctx.dead_letter(event, exc, "decode")
    if not valid:
        return
    try:
        scored = await ctx.run_blocking(models.score, [c for _, c in valid], settings)
        pairs = list(zip([e for e, _ in valid], scored, strict=True))
    except Exception as exc:
        # One bad text must not sink its batch: score one by one, dead-letter the culprit.
        log.exception("batch scoring failed (%s); retrying turn by turn", exc)
        pairs = []
        for event, cand in valid:
            try:
                one = await ctx.run_blocking(models.score, [cand], settings)
                pairs.append((event, one[0]))
            except Exception as exc1:
                await ctx.dead_letter(event, exc1, "score")
    for event, s in pairs:
        s.origin_partition = event.message.partition
        s.origin_offset = event.message.offset
        await ctx.scored.send(key=event.message.key, value=encode(s))
