"""The ``score_turns`` agent: candidates in, scored turns (or dead letters) out.

Each batch is decoded and validated; a bad event goes to ``turns.deadletter``
with its origin and error, and the partition keeps flowing. Valid turns are
pre-checked (empty, too long, language), then embedded and NLL-scored in the
inference thread, off the event loop. The agent never raises: Faust would ack
and drop the message if it did.

With ``judge.enabled``, the optional LLM judge (:mod:`streams.judge`) then
rates, in the same inference thread and in batches, every assistant turn that
has a ``prompt`` (the user turn it answers) and passed the checks above,
NLL threshold included: a turn those reject is never judged, since the judge is
the most expensive step and its verdict is applied last. User turns and
assistant turns without a prompt are not judged. The judge is built once, when
the agent starts, beside the other models.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from corpusfactory import contract
from corpusfactory.contract import CandidateTurn, ScoredTurn
from corpusfactory.engines.embedder import Embedder
from corpusfactory.engines.language import LanguageCheck
from corpusfactory.engines.scoring.calibration import seed_nll_threshold
from corpusfactory.engines.scoring.nll import MLMScorer
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import Settings
from streams.decisions import precheck, scored_precheck
from streams.judge import Judge, JudgeResult, make_judge_generator

log = logging.getLogger(__name__)

NOT_SCORED = -1.0  # nll on the wire for a turn rejected before scoring (JSON has no NaN)


@dataclass
class ScoringModels:
    embedder: Embedder
    scorer: MLMScorer
    nll_threshold: float
    language: LanguageCheck | None
    judge: Judge | None = None

    @classmethod
    def load(cls, settings: Settings) -> ScoringModels:
        adm = settings.admission
        models_dir = settings.models.models_dir
        scorer = MLMScorer.from_settings(settings)
        embedder = Embedder(settings.models.embedder, device=settings.models.device)
        threshold = adm.nll_threshold
        if adm.nll_threshold_percentile is not None:
            seeds = load_seeds(settings.producer.seed_file, settings.producer.seed_format)
            texts = [m.text for conv in seeds for m in conv.messages]
            threshold, cached = seed_nll_threshold(scorer, texts, adm.nll_threshold_percentile)
            log.info(
                "NLL threshold = p%.0f of %d seed messages = %.4f%s",
                adm.nll_threshold_percentile,
                len(texts),
                threshold,
                " (cached)" if cached else "",
            )
        language = LanguageCheck(adm.language, adm.language_min_chars) if adm.language else None
        judge = None
        if settings.judge.enabled:
            generator = make_judge_generator(settings.judge, models_dir)
            try:
                judge = Judge.from_settings(settings.judge, generator)
            except Exception:
                generator.close()
                raise
        return cls(embedder, scorer, threshold, language, judge)

    def close(self) -> None:
        """Release the judge's generator (the other models need nothing)."""
        if self.judge is not None:
            self.judge.generator.close()

    def score(self, turns: list[CandidateTurn], settings: Settings) -> list[ScoredTurn]:
        """Blocking: pre-check, NLL-score and embed a batch, then judge it (if enabled)."""
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
        bound = [False] * len(turns)
        stop = self.nll_threshold if adm.nll_early_stop else None
        t0 = time.perf_counter()
        results = self.scorer.score([texts[i] for i in todo], stop_above=stop)
        t1 = time.perf_counter()
        for i, res in zip(todo, results, strict=True):
            tokens[i] = res.tokens
            reasons[i] = scored_precheck(tokens=res.tokens, too_long=res.too_long, nll=res.nll)
            if not reasons[i]:
                nll[i] = float(res.nll)
                bound[i] = res.lower_bound
        keep = [i for i, r in enumerate(reasons) if not r]
        vectors = self.embedder.encode([texts[i] for i in keep])
        t2 = time.perf_counter()
        n = len(turns)
        stage_s = {"score": (t1 - t0) / n, "embed": (t2 - t1) / n}
        embedding: list[list[float]] = [[] for _ in turns]
        for i, v in zip(keep, vectors, strict=True):
            embedding[i] = [float(x) for x in v]
        judged: dict[int, JudgeResult] = {}
        if self.judge is not None:
            todo = [i for i in keep if _judgeable(turns[i]) and nll[i] < self.nll_threshold]
            if todo:
                pairs = [(turns[i].prompt, texts[i]) for i in todo]
                judged = dict(zip(todo, self.judge.rate(pairs), strict=True))
            stage_s["judge"] = (time.perf_counter() - t2) / n
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
                scorer=self.scorer.label,
                nll_threshold=self.nll_threshold,
                nll_lower_bound=bound[i],
                stage_s=stage_s,
                scored_at=now,
                **self._judge_fields(judged.get(i)),
            )
            for i, t in enumerate(turns)
        ]

    def _judge_fields(self, res: JudgeResult | None) -> dict[str, Any]:
        """The judge_* fields of a scored turn (none when the turn was not judged)."""
        if res is None or self.judge is None:
            return {}
        return {
            "judged": True,
            "judge_score": res.score,
            "judge_threshold": self.judge.threshold,
            "judge_on_unparsed": self.judge.on_unparsed,
            "judge": self.judge.id,
            "judge_output": res.raw[: contract.JUDGE_OUTPUT_CHARS],
        }


def _judgeable(turn: CandidateTurn) -> bool:
    """An assistant turn that answers a known user turn."""
    return turn.role == "assistant" and bool(turn.prompt.strip())


def register(ctx: Any) -> None:
    settings: Settings = ctx.settings
    adm = settings.admission

    @ctx.app.agent(ctx.candidates, name="score_turns", concurrency=1)
    async def score_turns(stream: Any) -> None:
        models: ScoringModels = await ctx.run_blocking(ScoringModels.load, settings)
        try:
            log.info(
                "scorer ready: embedder=%s scorer=%s judge=%s",
                models.embedder.id,
                models.scorer.label,
                models.judge.id if models.judge else "off",
            )
            async for events in stream.take_events(adm.score_batch_size, within=adm.batch_window_s):
                await _score_events(ctx, models, events)
        finally:
            models.close()


async def _score_events(ctx: Any, models: ScoringModels, events: list[Any]) -> None:
    """Score a batch; an event that cannot be scored is dead-lettered alone.

    Whatever breaks on one event (its decoding, its scoring, its encoding) costs
    that event only: it goes to the dead-letter topic with its origin and error,
    and every other event of the batch is scored and forwarded.
    """
    adm = ctx.settings.admission
    valid: list[tuple[Any, CandidateTurn]] = []
    for event in events:
        try:
            cand = contract.decode_candidate(
                event.message.value, adm.max_event_chars, adm.max_event_bytes
            )
        except Exception as exc:  # ContractError, or anything else this event breaks
            await ctx.dead_letter(event, exc, "decode")
            continue
        valid.append((event, cand))
    if not valid:
        return
    try:
        scored = await ctx.run_blocking(models.score, [c for _, c in valid], ctx.settings)
        pairs: list[tuple[Any, ScoredTurn]] = list(zip([e for e, _ in valid], scored, strict=True))
    except Exception as exc:
        # One bad text must not sink its batch: score one by one, dead-letter the culprit.
        log.error("batch scoring failed (%s: %s); scoring turn by turn", type(exc).__name__, exc)
        pairs = []
        for event, cand in valid:
            try:
                one = await ctx.run_blocking(models.score, [cand], ctx.settings)
                pairs.append((event, one[0]))
            except Exception as exc1:
                await ctx.dead_letter(event, exc1, "score")
    sent: list[ScoredTurn] = []
    for event, s in pairs:
        s.origin_partition = event.message.partition
        s.origin_offset = event.message.offset
        if await ctx.forward(ctx.scored, event, s, "score"):
            sent.append(s)
    ctx.metrics.observe_batch(sent)
