"""What `make demo` tells its user: progress lines, the summary and the example turns."""

from __future__ import annotations

import pytest

from corpusfactory.contract import SCHEMA_VERSION, Decision
from corpusfactory.tools.demo import DemoObserver, _summary
from producers.service import ProducerStats


def _decision(
    turn: str, reason: str, nll: float, neighbour: str = "", sim: float = 0.0
) -> Decision:
    return Decision(
        schema_version=SCHEMA_VERSION,
        turn_id=turn,
        conversation_id=turn.split("/")[0],
        index=0,
        accepted=reason == "accepted",
        reason=reason,
        neighbour_id=neighbour,
        similarity=sim,
        nll=nll,
        tokens=12,
        embedder="e",
        scorer="s",
        similarity_threshold=0.9,
        nll_threshold=5.0,
    )


def test_observer_prints_progress_and_keeps_examples(capsys: pytest.CaptureFixture[str]) -> None:
    obs = DemoObserver(target=4, neighbours={"seed:c1#0": "Ciao, come stai?"}, every_s=3600, keep=2)
    stats = ProducerStats()
    seen = [
        ("a/0", "accepted", 3.1, "seed:c1#0", 0.41, "Buongiorno a te!"),
        ("a/1", "quality", 7.9, "a/0", 0.2, "la la la di di"),
        ("b/0", "duplicate", 2.0, "seed:c1#0", 0.97, "Ciao, come stai?"),
        ("b/1", "accepted", 3.3, "a/0", 0.5, "Bene, grazie."),
        ("c/0", "accepted", 3.4, "", 0.0, "Terzo."),
    ]
    for turn, reason, nll, nb, sim, text in seen:
        stats.decisions[reason] += 1
        if turn == "b/1":
            stats.finished += 1  # a conversation finished: a progress line at once
        obs(_decision(turn, reason, nll, nb, sim), text, stats)
    out = capsys.readouterr().out.splitlines()
    # the first decision prints (nothing printed yet), then only the finished conversation
    assert len(out) == 2
    assert "conversations finished 1/4" in out[1]
    assert "turns decided 4, accepted 2 (50 %)" in out[1]
    assert "rejected: duplicate 1, quality 1" in out[1]
    assert [e["text"] for e in obs.examples["accepted"]] == ["Buongiorno a te!", "Bene, grazie."]
    dup = obs.examples["duplicate"][0]
    assert dup["neighbour"] == "Ciao, come stai?" and dup["similarity"] == 0.97
    # a neighbour from this run is looked up among the run's own turns
    assert obs.examples["quality"][0]["neighbour"] == "Buongiorno a te!"


def test_summary_shows_rates_as_percentages_and_examples() -> None:
    stats = ProducerStats(finished=15, truncated=1, published=16)
    stats.decisions.update({"accepted": 60, "quality": 30, "duplicate": 10})
    obs = DemoObserver(target=15, every_s=3600)
    obs(_decision("a/0", "quality", 8.25, "seed:x#1", 0.3), "testo  storto\nqui", stats)
    result = {
        "producer": stats.as_dict(),
        "examples": obs.examples,
        "corpus": {
            "turns": {"nll_accepted": {"p50": 3.2, "p90": None}, "acceptance_rate": 0.6},
            "conversations": {"total": 16, "truncated": 1, "messages": 80},
        },
        "throughput": {"decided_turns_per_s": 1.5, "generated_per_s": 2.0},
        "timing_s": {"produce": 60.0},
    }
    text = _summary(result)
    assert "turns accepted              60 (60.0 %)" in text
    assert "duplicate 10 (10.0 %), quality 30 (30.0 %)" in text
    assert "acceptance rate 60.0 %" in text
    assert "[quality] NLL 8.25 (threshold 5.00), cosine 0.30 to seed:x#1" in text
    assert "turn:      testo storto qui" in text
