"""The LLM-as-judge stage against the real stack: broker, Milvus Lite, a scorer whose
judge is the demo generator (transformers backend), and the admitter.

The demo generator is a toy that imitates the seed conversations: given the built-in
judge template it writes Italian chatter, never a score (the library's end-to-end
test shows that: every output is ``judge_unparsed``). To reach parsed scores through
the real model, the test's answers end inside a year the model learned from the
seeds ("... Nel 186", as in "Nel 1865 la capitale...") and the judge writes one
new token: a digit after "Nel 186" (5) and "Nel 188" (0), a word after "Nel 185".
``parse_score`` reads 5 and 0 as scores and a word as unparsed, so the three
outcomes are: accepted (5 >= 3), ``judge_low`` (0 < 3) and ``judge_unparsed``
(rejected). The expected scores are not hard-coded: the test runs the same judge
in-process first and takes, for each outcome, a pair the model rates that way here.
A real judge model uses the built-in template.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumers.store import CorpusStore
from consumers.writer import CorpusWriter
from corpusfactory import contract
from corpusfactory.contract import Reason
from corpusfactory.judge import Judge, make_judge_generator
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.models.demo import resolve_model
from corpusfactory.settings import Settings
from corpusfactory.stack import WorkerProcess
from producers.generators.base import make_generator
from producers.service import SelfChatProducer
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import (
    candidate,
    decisions_by_turn,
    producer,
    read_topic,
    wait_for,
)

pytestmark = pytest.mark.integration

# The judge's template: the pair as a chat, and the model continues the answer.
TEMPLATE = "[|Umano|] {instruction}\n[|Assistente|] {response}"
THRESHOLD = 3.0
# Answers that end inside a year the model learned: it continues with one token,
# a digit for the first two ("Nel 1865", "Nel 1880"), a word for the third.
ENDINGS = {"high": " Nel 186", "low": " Nel 188", "unparsed": " Nel 185"}
# The self-chat run's judge: the model continues "e nel 187" with 1 or, rarely, 0.
SELFCHAT_TEMPLATE = "[|Umano|] {instruction}\n[|Assistente|] {response}\n[|Umano|] e nel 187"
SELFCHAT_THRESHOLD = 1.0
POOL = {
    "capitale": ("Qual è la capitale d'Italia?", "La capitale d'Italia è Roma."),
    "libro": ("Mi consigli un libro?", "Ti consiglio I promessi sposi di Alessandro Manzoni."),
    "moka": (
        "Come si fa il caffè con la moka?",
        "Si riempie la caldaia d'acqua e si mette sul fuoco.",
    ),
    "cartoni": ("Dove vanno i cartoni della pizza?", "Nella carta, se non sono troppo unti."),
    "cielo": ("Perché il cielo è blu?", "Perché l'aria diffonde soprattutto la luce blu."),
    "treno": ("A che ora parte il treno?", "Il primo treno per Bologna parte alle sette."),
    "pasta": ("Quanto sale metto nella pasta?", "Circa dieci grammi per litro d'acqua."),
    "montagna": ("Dove andiamo in montagna?", "Le Dolomiti sono bellissime in estate."),
    "storia": ("Chi ha unificato l'Italia?", "Garibaldi, Cavour e Vittorio Emanuele II."),
    "gatto": ("Il mio gatto non mangia, che faccio?", "Portalo dal veterinario se dura."),
    "lingua": ("Come imparo l'inglese?", "Leggi ogni giorno e parla con persone del posto."),
    "pioggia": ("Domani piove?", "Le previsioni dicono sole al mattino e pioggia la sera."),
}


@dataclass(frozen=True)
class JudgeCase:
    """One pair per outcome, and what the judge makes of each here."""

    pairs: dict[str, tuple[str, str]]  # outcome name -> (instruction, response)
    scores: dict[str, float | None]  # outcome name -> the judge's score
    raws: dict[str, str]  # outcome name -> the judge's output


def _outcome(score: float | None) -> str:
    return "unparsed" if score is None else "high" if score >= THRESHOLD else "low"


def pick_case(settings: Settings) -> JudgeCase:
    """For each outcome, the first pool pair (each a different one) whose answer, with
    that outcome's ending, the same judge run here rates that way."""
    gen = make_judge_generator(settings.judge, settings.models.models_dir)
    try:
        judge = Judge.from_settings(settings.judge, gen)
        pairs, scores, raws, used = {}, {}, {}, set()
        tried: dict[str, list[str]] = {}
        # Each ending is tried on every pair; an outcome takes the first pair (not yet
        # used) that some ending makes the judge rate that way, that ending's own first.
        order = {o: [ENDINGS[o], *(e for k, e in ENDINGS.items() if k != o)] for o in ENDINGS}
        rated_by: dict[str, list[Any]] = {}
        for ending in ENDINGS.values():
            rated_by[ending] = judge.rate([(POOL[n][0], POOL[n][1] + ending) for n in POOL])
            tried[ending] = [r.raw for r in rated_by[ending]]
        for outcome in ENDINGS:
            found = False
            for ending in order[outcome]:
                for name, r in zip(POOL, rated_by[ending], strict=True):
                    if name not in used and _outcome(r.score) == outcome:
                        used.add(name)
                        pairs[outcome] = (POOL[name][0], POOL[name][1] + ending)
                        scores[outcome], raws[outcome] = r.score, r.raw
                        found = True
                        break
                if found:
                    break
    finally:
        gen.close()
    assert set(pairs) == set(ENDINGS), f"the demo model rates no pair that way: {tried}"
    return JudgeCase(pairs, scores, raws)


@dataclass
class JudgeStack:
    settings: Settings
    bootstrap: str
    scorer: WorkerProcess  # the scorer running now (a test may swap it)
    case: JudgeCase


@pytest.fixture(scope="module")
def judge_stack(tmp_path_factory, kafka_bootstrap, built_models) -> Iterator[JudgeStack]:
    settings = make_settings(
        tmp_path_factory.mktemp("judge"),
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        # The NLL filter lets everything through here: the judge decides.
        admission={"nll_threshold_percentile": None, "nll_threshold": 1000.0},
        judge={
            "enabled": True,
            "backend": "transformers",
            "model": "demo:generator",
            "device": "cpu",
            "template": TEMPLATE,
            "max_new_tokens": 1,
            "batch_size": 1,
            "threshold": THRESHOLD,
            "on_unparsed": "reject",
        },
    )
    case = pick_case(settings)
    ensure_topics(settings, kafka_bootstrap)
    admitter = WorkerProcess(settings, "admitter").start()
    scorer = WorkerProcess(settings, "scorer").start()
    try:
        admitter.wait_ready()
        scorer.wait_ready()
        assert "judge=transformers:generator" in scorer.log_text()
        stack = JudgeStack(settings, kafka_bootstrap, scorer, case)
        yield stack
        scorer = stack.scorer
    finally:
        scorer.stop()
        admitter.stop()


def send(settings: Settings, bootstrap: str, cands: list[contract.CandidateTurn]) -> None:
    prod = producer(bootstrap)
    for c in cands:
        prod.send(
            settings.topic(contract.CANDIDATES),
            key=c.conversation_id.encode(),
            value=contract.encode(c),
        )
    prod.flush()
    prod.close()


def test_assistant_turns_are_judged_and_low_or_unreadable_verdicts_rejected(
    judge_stack: JudgeStack,
) -> None:
    s, bootstrap, case = judge_stack.settings, judge_stack.bootstrap, judge_stack.case
    expected = case.scores
    threshold = THRESHOLD
    hi, lo = expected["high"], expected["low"]
    assert hi is not None and lo is not None and lo < threshold <= hi
    assert expected["unparsed"] is None

    run = uuid.uuid4().hex[:6]
    cands: list[contract.CandidateTurn] = []
    for name, (question, answer) in case.pairs.items():
        cands.append(candidate(f"j{run}-{name}", 0, question))
        cands.append(candidate(f"j{run}-{name}", 1, answer, prompt=question))
    # An assistant turn whose producer did not say what it answers: not judged.
    no_prompt = candidate(
        f"j{run}-noprompt", 1, "Certo, ecco una ricetta semplice per la focaccia."
    )
    cands.append(no_prompt)
    send(s, bootstrap, cands)
    ids = {c.turn_id for c in cands}

    def decided() -> dict[str, list[contract.Decision]] | None:
        ds = decisions_by_turn(bootstrap, s)
        return ds if ids <= set(ds) else None

    got = {t: ds[0] for t, ds in wait_for(decided, 240, "decisions").items() if t in ids}

    for c in cands:
        d = got[c.turn_id]
        if c.role == "user" or not c.prompt:
            # not judged: decided by the other filters alone
            assert (d.judge_score, d.judge_threshold, d.judge) == (None, None, ""), c.turn_id
            assert d.reason not in (Reason.JUDGE_LOW, Reason.JUDGE_UNPARSED), c.turn_id
            continue
        name = c.conversation_id.split("-", 1)[1]
        want = expected[name]
        assert d.judge_score == want, name
        assert d.judge_threshold == threshold and d.judge == "transformers:generator", name
        # every other filter passed (no duplicate, NLL threshold 1000): the judge decides
        assert d.similarity <= s.admission.similarity_threshold, name
        if want is None:
            assert (d.accepted, d.reason) == (False, Reason.JUDGE_UNPARSED), name
        elif want < threshold:
            assert (d.accepted, d.reason) == (False, Reason.JUDGE_LOW), name
        else:
            assert (d.accepted, d.reason) == (True, "accepted"), name
    assert got[no_prompt.turn_id].accepted

    # The scored turns carry the judge's raw output for audit.
    scored = [
        contract.decode_scored(r.value) for r in read_topic(bootstrap, s.topic(contract.SCORED))
    ]
    outputs = {x.candidate.turn_id: x for x in scored if x.candidate.turn_id in ids}
    for c in cands:
        x = outputs[c.turn_id]
        assert x.judged == bool(c.prompt), c.turn_id
        if x.judged:
            name = c.conversation_id.split("-", 1)[1]
            assert x.judge_output == case.raws[name] and x.judge_on_unparsed == "reject"

    # Sent again (a producer re-sending after a timeout): the logged decision comes back,
    # judge score included.
    send(s, bootstrap, cands)

    def redecided() -> dict[str, list[contract.Decision]] | None:
        ds = decisions_by_turn(bootstrap, s)
        return ds if all(len(ds.get(t, [])) >= 2 for t in ids) else None

    again = wait_for(redecided, 240, "decisions of the re-sent turns")
    for t in ids:
        first, second = again[t][0], again[t][1]
        assert second.replayed, t
        assert (second.accepted, second.reason, second.judge_score) == (
            first.accepted,
            first.reason,
            first.judge_score,
        ), t


def test_a_selfchat_run_stores_each_accepted_turn_with_its_judge_score(
    judge_stack: JudgeStack, tmp_path: Path
) -> None:
    # A second scorer in the same consumer group takes over, with a template the model
    # continues with 1 (mostly) or 0 on the generator's own turns (measured on 50 pairs)
    # and threshold 1: the judge passes most turns, so conversations get stored.
    s = judge_stack.settings.model_copy(deep=True)
    s.judge.template = SELFCHAT_TEMPLATE
    s.judge.threshold = SELFCHAT_THRESHOLD
    judge_stack.scorer.stop()
    judge_stack.scorer = WorkerProcess(s, "scorer", name="scorer-selfchat").start()
    judge_stack.scorer.wait_ready()
    s.producer.conversations = 3
    s.producer.producer_id = "p-judge"
    gen = make_generator(s.producer, resolve_model(s.models.generator), "cpu")
    try:
        stats = asyncio.run(SelfChatProducer(s, judge_stack.bootstrap, gen).run())
    finally:
        gen.close()
    assert stats.finished + stats.truncated == 3

    cands = [
        json.loads(r.value) for r in read_topic(judge_stack.bootstrap, s.topic(contract.CANDIDATES))
    ]
    mine = [c for c in cands if c.get("producer_id") == "p-judge"]
    decisions = decisions_by_turn(judge_stack.bootstrap, s)
    by_id = {c["turn_id"]: c for c in mine}
    for c in mine:
        d = decisions[c["turn_id"]][0]
        if c["role"] == "assistant":
            # the prompt is the accepted user turn this one answers
            user = next(
                u
                for u in mine
                if u["conversation_id"] == c["conversation_id"]
                and u["index"] == c["index"] - 1
                and decisions[u["turn_id"]][0].accepted
            )
            assert c["prompt"] == user["text"]
            if d.reason not in ("empty", "too_long", "low_quality"):
                assert d.judge == "transformers:generator", c["turn_id"]
        else:
            assert c["prompt"] == "" and d.judge_score is None and d.judge == ""

    with CorpusWriter(s, judge_stack.bootstrap) as writer:
        assert writer.run_once(60.0).drained
    out = tmp_path / "corpus.jsonl"
    CorpusStore(s.state_path / "corpus", read_only=True).export(out)
    corpus = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    stored = [t for conv in corpus for t in conv["turns"] if t["turn_id"] in by_id]
    assert stored, "no conversation of this run was stored"
    for t in stored:
        d = decisions[t["turn_id"]][0]
        assert d.accepted and t["judge_score"] == d.judge_score, t["turn_id"]
        if t["role"] == "assistant":
            # accepted by the judge: a readable score at or above the threshold
            assert t["judge_score"] is not None and t["judge_score"] >= SELFCHAT_THRESHOLD
        else:
            assert t["judge_score"] is None
    assert any(t["role"] == "assistant" for t in stored), stats.as_dict()
