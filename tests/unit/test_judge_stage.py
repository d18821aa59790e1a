"""The LLM judge wired into admission: which turns the scorer judges, what the
admitter decides and logs. The models and the index are test doubles here; the
real stack (broker, Milvus Lite, the demo generator as judge) is exercised in
tests/integration/test_judge_admission.py."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from corpusfactory import contract
from corpusfactory.contract import DecisionLogRow, Reason
from corpusfactory.engines.index import Neighbour, VectorIndex
from corpusfactory.engines.scoring.nll import NLLResult
from corpusfactory.settings import GenerationSettings, Settings, load_settings
from streams.admit import Admitter
from streams.judge import Judge
from streams.score import NOT_SCORED, ScoringModels


class ScriptedJudgeGenerator:
    """TEST DOUBLE of the generator interface: the judge's outputs, by prompt text."""

    id = "scripted:judge"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers  # response text -> what the judge writes
        self.prompts: list[str] = []
        self.closed = False

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        self.prompts.extend(prompts)
        return [next(v for k, v in self.answers.items() if k in p) for p in prompts]

    def close(self) -> None:
        self.closed = True


class FakeScorer:
    """TEST DOUBLE of the MLM scorer: NLL 1.0, or 9.0 for a text containing "BAD"."""

    id = label = "fake:scorer"

    def score(self, texts: Sequence[str], stop_above: float | None = None) -> list[NLLResult]:
        return [NLLResult(9.0 if "BAD" in t else 1.0, len(t.split()), False) for t in texts]


class FakeEmbedder:
    """TEST DOUBLE of the embedder: each distinct text its own basis vector (cosine 0)."""

    id = "fake:embedder"
    dim = 16

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, self.seen.setdefault(t, len(self.seen))] = 1.0
        return out


def turn(conv: str, index: int, text: str, prompt: str = "") -> contract.CandidateTurn:
    return contract.CandidateTurn(
        schema_version=1,
        turn_id=f"{conv}:{index}:0",
        conversation_id=conv,
        index=index,
        role="user" if index % 2 == 0 else "assistant",
        text=text,
        prompt=prompt,
    )


def models(gen: ScriptedJudgeGenerator | None, **judge_kw: Any) -> ScoringModels:
    judge = Judge(gen, **judge_kw) if gen is not None else None
    return ScoringModels(FakeEmbedder(), FakeScorer(), 2.0, None, judge)  # type: ignore[arg-type]


def settings() -> Settings:
    return load_settings(None, environ={})


TURNS = [
    turn("c1", 0, "Qual è la capitale d'Italia?"),  # a user turn: never judged
    turn("c1", 1, "La capitale è Roma.", prompt="Qual è la capitale d'Italia?"),
    turn("c2", 1, "Risposta senza richiesta."),  # no prompt (another producer): not judged
    turn("c3", 1, "BAD risposta confusa.", prompt="Ciao?"),  # low_quality: not judged
    turn("c4", 1, "   ", prompt="Ciao?"),  # empty: not judged
    turn("c5", 1, "Forse Milano.", prompt="Qual è la capitale d'Italia?"),
    turn("c6", 1, "Boh.", prompt="Dimmi qualcosa."),
]
ANSWERS = {
    "La capitale è Roma.": "5\nCorretta e completa.",
    "Forse Milano.": "Punteggio: 1 - sbagliata.",
    "Boh.": "Non saprei valutare.",
}


def test_the_scorer_judges_assistant_turns_with_a_prompt_that_passed_its_checks() -> None:
    gen = ScriptedJudgeGenerator(ANSWERS)
    scored = models(gen, threshold=3.0, batch_size=2).score(TURNS, settings())
    by_id = {s.candidate.turn_id: s for s in scored}
    assert len(gen.prompts) == 3
    assert all("Qual è la capitale" in p or "Dimmi qualcosa" in p for p in gen.prompts)
    expected = {"c1:1:0": 5.0, "c5:1:0": 1.0, "c6:1:0": None}
    for tid, s in by_id.items():
        if tid in expected:
            assert s.judged and s.judge_score == expected[tid], tid
            assert (s.judge_threshold, s.judge_on_unparsed, s.judge) == (
                3.0,
                "reject",
                "scripted:judge",
            )
            assert s.judge_output == ANSWERS[s.candidate.text][: contract.JUDGE_OUTPUT_CHARS]
        else:
            assert not s.judged and s.judge_score is None and s.judge == "", tid
    assert by_id["c3:1:0"].nll == 9.0 and by_id["c4:1:0"].precheck == "empty"
    assert by_id["c4:1:0"].nll == NOT_SCORED
    assert set(scored[0].stage_s or {}) == {"score", "embed", "judge"}
    # The wire form decodes, judge fields included.
    back = contract.decode_scored(contract.encode(by_id["c5:1:0"]))
    assert (back.judged, back.judge_score) == (True, 1.0)


def test_without_a_judge_nothing_is_judged() -> None:
    scored = models(None).score(TURNS, settings())
    assert not any(s.judged for s in scored)
    assert set(scored[0].stage_s or {}) == {"score", "embed"}


def test_close_releases_the_judge_generator() -> None:
    gen = ScriptedJudgeGenerator(ANSWERS)
    models(gen).close()
    assert gen.closed
    models(None).close()  # nothing to release


class MemoryIndex:
    """TEST DOUBLE of VectorIndex (the methods the admitter uses), in memory."""

    dim = FakeEmbedder.dim
    check_log_rows = staticmethod(VectorIndex.check_log_rows)

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.log: dict[str, DecisionLogRow] = {}

    def prior_decisions(self, refs: Sequence[str]) -> dict[str, DecisionLogRow]:
        return {r: self.log[r] for r in refs if r in self.log}

    def log_decisions(self, decisions: dict[str, DecisionLogRow]) -> None:
        self.log.update(decisions)

    def search(
        self, vectors: np.ndarray, exclude: Sequence[str] | None = None, reserved: bool = False
    ) -> list[Neighbour | None]:
        out: list[Neighbour | None] = []
        for i, v in enumerate(vectors):
            sims = [
                (float(v @ w), r) for r, w in self.vectors.items() if not exclude or r != exclude[i]
            ]
            best = max(sims, default=None)
            out.append(Neighbour(best[1], best[0]) if best else None)
        return out

    def existing(self, refs: Sequence[str], reserved: bool = False) -> set[str]:
        return {r for r in refs if r in self.vectors}

    def upsert(self, refs: Sequence[str], vectors: np.ndarray, kind: str) -> None:
        self.vectors.update(zip(refs, vectors, strict=True))


def test_the_admitter_applies_the_judge_last_and_logs_the_score_for_replays() -> None:
    gen = ScriptedJudgeGenerator(ANSWERS)
    s = settings()
    scored = models(gen, threshold=3.0).score(TURNS, s)
    index = MemoryIndex()
    admitter = Admitter(s, index)  # type: ignore[arg-type]
    decisions = {d.turn_id: d for d in admitter.admit(scored)}
    got = {t: (d.accepted, d.reason, d.judge_score) for t, d in decisions.items()}
    assert got == {
        "c1:0:0": (True, "accepted", None),
        "c1:1:0": (True, "accepted", 5.0),
        "c2:1:0": (True, "accepted", None),
        "c3:1:0": (False, "low_quality", None),
        "c4:1:0": (False, "empty", None),
        "c5:1:0": (False, Reason.JUDGE_LOW, 1.0),
        "c6:1:0": (False, Reason.JUDGE_UNPARSED, None),
    }
    for t, d in decisions.items():
        judged = t in ("c1:1:0", "c5:1:0", "c6:1:0")
        assert d.judge_threshold == (3.0 if judged else None), t
        assert d.judge == ("scripted:judge" if judged else ""), t
        assert contract.decode_decision(contract.encode(d)) == d
    # A replay (a redelivered scored turn, re-judged differently) gets the logged decision.
    gen.answers = {k: "0" for k in ANSWERS}
    rescored = models(gen, threshold=3.0).score(TURNS, s)
    again = {d.turn_id: d for d in admitter.admit(rescored)}
    for t, d in again.items():
        assert d.replayed
        assert (d.accepted, d.reason, d.judge_score, d.judge_threshold) == (
            decisions[t].accepted,
            decisions[t].reason,
            decisions[t].judge_score,
            decisions[t].judge_threshold,
        ), t
    # A log row written before the judge existed replays with no judge fields.
    judge_fields = ("judge_score", "judge_threshold", "judge")
    for ref, rec in list(index.log.items()):
        row = {k: v for k, v in rec.as_dict().items() if k not in judge_fields}
        index.log[ref] = DecisionLogRow.from_dict(row)
    old = {d.turn_id: d for d in admitter.admit(rescored)}
    assert all(
        (d.judge_score, d.judge_threshold, d.judge) == (None, None, "") for d in old.values()
    )
    assert old["c5:1:0"].reason == Reason.JUDGE_LOW and time.time() >= old["c5:1:0"].decided_at


def test_on_unparsed_accept_lets_an_unreadable_verdict_through() -> None:
    gen = ScriptedJudgeGenerator(ANSWERS)
    s = settings()
    scored = models(gen, threshold=3.0, on_unparsed="accept").score(TURNS, s)
    assert {x.judge_on_unparsed for x in scored if x.judged} == {"accept"}
    decisions = {d.turn_id: d for d in Admitter(s, MemoryIndex()).admit(scored)}  # type: ignore[arg-type]
    assert (decisions["c6:1:0"].accepted, decisions["c6:1:0"].reason) == (True, "accepted")
    assert decisions["c6:1:0"].judge_score is None
    assert decisions["c5:1:0"].reason == Reason.JUDGE_LOW
