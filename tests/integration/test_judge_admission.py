"""The LLM-as-judge stage against the real stack: broker, Milvus Lite, a scorer whose
judge is an OpenAI-compatible server, and the admitter.

The judge server is scripted (``tests/integration/scripted_judge.py``): it answers
each prompt with the output of the first rule whose text the prompt holds, so every
score is known before the test runs instead of being computed by the judge under test.
Everything else is the real path: the built-in judge template, the project's OpenAI
client in the scorer worker, ``parse_score``, the decision, the decision log, the
scored-turns topic and the corpus store.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consumers.store import CorpusStore
from consumers.writer import CorpusWriter
from corpusfactory import contract
from corpusfactory.contract import Reason
from corpusfactory.engines.models.demo import resolve_model
from corpusfactory.settings import Settings
from producers.generators.factory import make_generator
from producers.service import SelfChatProducer
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import (
    candidate,
    decisions_by_turn,
    producer,
    read_topic,
    wait_decided,
    worker_stack,
)
from tests.integration.scripted_judge import ScriptedJudge

pytestmark = pytest.mark.integration

THRESHOLD = 3.0
JUDGE_ID = "openai:scripted-judge"
# outcome -> (instruction, response, the judge's scripted output, the score it reads as)
CASES: dict[str, tuple[str, str, str, float | None]] = {
    "high": ("Qual è la capitale d'Italia?", "La capitale d'Italia è Roma.", " 5", 5.0),
    "scale": (
        "Dove vanno i cartoni della pizza?",
        "Nella carta, se non sono troppo unti.",
        " Voto: 8/10, chiara e utile.",
        4.0,
    ),
    "low": (
        "Mi consigli un libro?",
        "Ti consiglio I promessi sposi di Alessandro Manzoni.",
        " 1",
        1.0,
    ),
    "unparsed": (
        "Come si fa il caffè con la moka?",
        "Si riempie la caldaia d'acqua e si mette sul fuoco.",
        " Dipende dai gusti.",
        None,
    ),
}
# Any other pair (the self-chat run's turns) is rated 4.
DEFAULT_OUTPUT, DEFAULT_SCORE = " 4", 4.0


def expected_reason(score: float | None) -> tuple[bool, str]:
    if score is None:
        return False, Reason.JUDGE_UNPARSED
    return (True, Reason.ACCEPTED) if score >= THRESHOLD else (False, Reason.JUDGE_LOW)


@dataclass
class JudgeStack:
    settings: Settings
    bootstrap: str
    server: ScriptedJudge


@pytest.fixture(scope="module")
def judge_stack(tmp_path_factory, kafka_bootstrap, built_models) -> Iterator[JudgeStack]:
    rules = [(response, output) for _, response, output, _ in CASES.values()]
    with ScriptedJudge(rules, DEFAULT_OUTPUT) as server:
        settings = make_settings(
            tmp_path_factory.mktemp("judge"),
            kafka_bootstrap,
            f"t{uuid.uuid4().hex[:8]}.",
            # The NLL filter lets everything through here: the judge decides.
            admission={"nll_threshold_percentile": None, "nll_threshold": 1000.0},
            judge={
                "enabled": True,
                "backend": "openai",
                "model": "scripted-judge",
                "openai_base_url": server.base_url,
                "max_new_tokens": 16,
                "threshold": THRESHOLD,
                "on_unparsed": "reject",
            },
        )
        with worker_stack(settings, kafka_bootstrap) as running:
            assert f"judge={JUDGE_ID}" in running.scorer.log_text()
            yield JudgeStack(settings, kafka_bootstrap, server)


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
    s, bootstrap, server = judge_stack.settings, judge_stack.bootstrap, judge_stack.server
    run = uuid.uuid4().hex[:6]
    cands: list[contract.CandidateTurn] = []
    for name, (question, answer, _, _) in CASES.items():
        cands.append(candidate(f"j{run}-{name}", 0, question))
        cands.append(candidate(f"j{run}-{name}", 1, answer, prompt=question))
    # An assistant turn whose producer did not say what it answers: not judged.
    no_prompt = candidate(
        f"j{run}-noprompt", 1, "Certo, ecco una ricetta semplice per la focaccia."
    )
    cands.append(no_prompt)
    send(s, bootstrap, cands)
    ids = {c.turn_id for c in cands}

    got = {t: ds[0] for t, ds in wait_decided(bootstrap, s, ids, timeout=240).items() if t in ids}

    for c in cands:
        d = got[c.turn_id]
        if c.role == "user" or not c.prompt:
            # not judged: decided by the other filters alone
            assert (d.judge_score, d.judge_threshold, d.judge) == (None, None, ""), c.turn_id
            assert d.reason not in (Reason.JUDGE_LOW, Reason.JUDGE_UNPARSED), c.turn_id
            continue
        name = c.conversation_id.split("-", 1)[1]
        score = CASES[name][3]
        assert d.judge_score == score, name
        assert d.judge_threshold == THRESHOLD and d.judge == JUDGE_ID, name
        # every other filter passed (no duplicate, NLL threshold 1000): the judge decides
        assert d.similarity <= s.admission.similarity_threshold, name
        assert (d.accepted, d.reason) == expected_reason(score), name
    # Each judged pair reached the server once, in the built-in template (instruction
    # and response both in the prompt); the unjudged turns never did.
    for name, (question, answer, _, _) in CASES.items():
        assert server.asked(answer) == 1, name
        assert any(question in p and answer in p for p in server.prompts), name
    assert server.asked(no_prompt.text) == 0
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
            assert x.judge_output == CASES[name][2] and x.judge_on_unparsed == "reject"

    # Sent again (a producer re-sending after a timeout): the logged decision comes back,
    # judge score included.
    send(s, bootstrap, cands)

    again = wait_decided(bootstrap, s, ids, times=2, timeout=240)  # the re-sent turns
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
    # The toy generator's own turns: the scripted judge rates every pair 4 (>= 3).
    s = judge_stack.settings.model_copy(deep=True)
    server = judge_stack.server
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
            if d.reason not in (Reason.EMPTY, Reason.TOO_LONG, Reason.LOW_QUALITY):
                # judged: the pair reached the judge, and its score is the script's
                assert d.judge == JUDGE_ID and d.judge_score == DEFAULT_SCORE, c["turn_id"]
                assert server.asked(c["text"]) >= 1, c["turn_id"]
                assert (d.accepted, d.reason) in {
                    (True, Reason.ACCEPTED),
                    (False, Reason.DUPLICATE),
                    (False, Reason.CONTAMINATED),
                }, c["turn_id"]
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
            # accepted by the judge: the scripted score
            assert t["judge_score"] == DEFAULT_SCORE
        else:
            assert t["judge_score"] is None
    assert any(t["role"] == "assistant" for t in stored), stats.as_dict()
