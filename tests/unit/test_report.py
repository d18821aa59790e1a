"""The run report: counts per series, PNGs, the HTML page, an empty run, the seeds' NLL.

Every test builds a real state directory (corpus store, snapshot evaluations) in
tmp_path and reads it back with ``build_report``; run with
``.venv/bin/python -m pytest tests/unit/test_report.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from consumers.store import CorpusStore
from corpusfactory.atomicio import write_json_atomic
from corpusfactory.cli.main import main
from corpusfactory.contract import (
    SCHEMA_VERSION,
    AcceptedConversation,
    AcceptedTurn,
    Decision,
    first_decisions,
)
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.seeds import load_seeds, seed_messages
from corpusfactory.settings import Settings, load_settings
from corpusfactory.tools.report.build import build_report
from corpusfactory.tools.report.plots import time_bins
from training.snapshots import BASE_ID, MANIFEST, SnapshotStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0
EVIL = "<script>alert(1)</script>"


def decision(
    turn_id: str,
    reason: str,
    nll: float,
    *,
    source: str = "selfchat",
    at: float = T0,
    neighbour: str = "",
    similarity: float = 0.0,
    replayed: bool = False,
    nll_threshold: float = 2.0,
) -> Decision:
    return Decision(
        schema_version=SCHEMA_VERSION,
        turn_id=turn_id,
        conversation_id=f"conv-{turn_id}",
        index=0,
        accepted=reason == "accepted",
        reason=reason,
        neighbour_id=neighbour,
        similarity=similarity,
        nll=nll,
        tokens=0 if nll < 0 else 7,
        embedder="emb",
        scorer="sc",
        similarity_threshold=0.9,
        nll_threshold=nll_threshold,
        replayed=replayed,
        decided_at=at,
        source=source,
    )


def conversation(cid: str, source: str, nlls: list[float]) -> AcceptedConversation:
    turns = [
        AcceptedTurn(
            turn_id=f"{cid}-t{i}",
            role="user" if i % 2 == 0 else "assistant",
            text=f"Messaggio {i} della conversazione {cid}.",
            nll=nll,
            similarity=0.2,
            neighbour_id="",
            embedder="emb",
            scorer="sc",
        )
        for i, nll in enumerate(nlls)
    ]
    return AcceptedConversation(
        schema_version=SCHEMA_VERSION,
        conversation_id=cid,
        source=source,
        turns=turns,
        target_length=len(nlls),
        truncated=False,
        producer_id="p0",
        generator="gen",
        finished_at=T0 + 500,
    )


# Decisions of one run, in the order they are stored. By hand: 4 scored self-chat
# turns (t1..t4; t1 also replayed), 1 unscored self-chat turn (t5), 2 scored
# ingested turns (i1 fauno, i2 oasst), 1 unscored ingested turn (i3), 1 turn from
# before decisions carried a source (l1). 3 turns were searched (t3, t4, i1).
DECISIONS = [
    decision("t1", "accepted", 1.0, at=T0),
    decision("t5", "empty", -1.0, at=T0 + 10),
    decision("t2", "low_quality", 2.5, at=T0 + 30),
    decision("t3", "duplicate", 1.2, at=T0 + 60, neighbour="seed-001#0", similarity=0.95),
    decision("t1", "accepted", 1.0, at=T0 + 90, replayed=True),
    decision("i1", "accepted", 1.5, source="fauno", at=T0 + 120, neighbour="t1", similarity=0.3),
    decision("i2", "low_quality", 3.0, source="oasst", at=T0 + 150),
    decision("i3", "wrong_language", -1.0, source=EVIL, at=T0 + 200),
    decision("l1", "accepted", 1.1, source="", at=T0 + 300, nll_threshold=1.8),
    decision("t4", "accepted", 0.9, at=T0 + 400, neighbour="t2", similarity=0.4),
]
CONVERSATIONS = [
    conversation("A", "selfchat", [1.0, 0.9]),
    conversation("B", EVIL, [1.5, 1.1, 0.7]),
]


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(environ={}, overrides={"state_dir": str(tmp_path / "state"), **overrides})


def write_store(settings: Settings, decisions: list[Decision], convs: list[Any]) -> None:
    with CorpusStore(settings.state_path / "corpus") as store:
        store.write_batch(accepted=convs, decisions=decisions)


def write_evaluations(settings: Settings) -> None:
    """The base model and one snapshot, each with a SQuAD-it and an EVALITA result."""
    store = SnapshotStore(settings.snapshots_path)
    sid = "snap-00001-20260101T000000Z"
    tmp = store.staging(sid)
    write_json_atomic(tmp / MANIFEST, {"id": sid, "seq": 1, "parent": ""})
    (tmp / "model.safetensors").write_bytes(b"not really weights")
    store.publish(sid)
    base = store.eval_dir(BASE_ID, settings.training.base_model)
    write_json_atomic(base / "squad_it.json", {"f1": 40.0, "em": 30.0, "n": 10})
    snap = store.eval_dir(sid)
    write_json_atomic(snap / "squad_it.json", {"f1": 45.0, "em": 35.0, "n": 10})
    write_json_atomic(snap / "sentipolc2014.json", {"macro_f1": 55.0, "n": 20})


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 0 and img.size[1] > 0


@pytest.fixture
def run_settings(tmp_path: Path) -> Settings:
    s = settings_for(tmp_path)
    write_store(s, DECISIONS, CONVERSATIONS)
    write_evaluations(s)
    return s


def test_every_figure_has_the_hand_counted_points(run_settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = build_report(run_settings, out, seeds_nll=False)
    assert sorted(f.name for f in result.figures) == [
        "acceptance_over_time",
        "cosine_hist",
        "evaluation",
        "nll_by_corpus",
    ]
    assert result.missing == {}
    for fig in result.figures:
        assert_png(out / fig.file)
        assert fig.series and all(n > 0 for n in fig.series.values()), fig
    # Seeds not scored; generated = t1..t4 (t1 once); accepted = 2 + 3 turns;
    # ingested = i1, i2 (i3 unscored, l1 has no source).
    assert result.figure("nll_by_corpus").series == {"generated": 4, "accepted": 5, "ingested": 2}
    assert result.figure("nll_by_corpus").details["threshold"] == 2.0  # most decisions
    timeline = result.figure("acceptance_over_time")
    assert timeline.series == {
        "decisions": 9,
        "accepted": 4,
        "empty": 1,
        "low_quality": 2,
        "duplicate": 1,
        "wrong_language": 1,
    }
    # The run spans 400 s: 15 s bins are the narrowest that give at most 30 bins.
    assert (timeline.details["bin_s"], timeline.details["bins"]) == (15.0, 27)
    assert result.figure("cosine_hist").series == {"searched": 3}
    assert result.figure("cosine_hist").details["threshold"] == 0.9
    # Two models with SQuAD-it results, one (the snapshot) with a sentiment result.
    assert result.figure("evaluation").series == {
        "squad_it_f1": 2,
        "squad_it_em": 2,
        "sentipolc2014_f1": 1,
    }
    assert "NLL by corpus: no seeds data, series left out" in result.notes
    assert any(n.startswith("1 scored turn(s) without a recorded source") for n in result.notes)


def test_counts_count_each_turn_once(run_settings: Settings, tmp_path: Path) -> None:
    result = build_report(run_settings, tmp_path / "report", seeds_nll=False)
    dec = result.counts["decisions"]
    assert (dec["records"], dec["turns"], dec["repeated_records"]) == (10, 9, 1)
    assert dec["accepted"] == 4 and dec["acceptance_rate"] == pytest.approx(4 / 9)
    assert dec["by_reason"]["accepted"] == 4 and dec["by_reason"]["judge_low"] == 0
    assert dec["by_source"] == {"": 1, EVIL: 1, "fauno": 1, "oasst": 1, "selfchat": 5}
    assert result.counts["conversations"] == {
        "total": 2,
        "by_source": {EVIL: 1, "selfchat": 1},
        "turns": 5,
    }
    nll = result.counts["nll"]
    assert nll["generated"]["n"] == 4 and nll["generated"]["p50"] == pytest.approx(1.1)
    ingested = {"n": 2, "p10": 1.65, "p25": 1.875, "p50": 2.25, "p75": 2.625, "p90": 2.85}
    assert nll["ingested"] == pytest.approx(ingested)
    assert nll["seeds"]["n"] == 0 and nll["seeds"]["p50"] is None
    on_disk = json.loads(result.json.read_text(encoding="utf-8"))
    assert on_disk["counts"] == json.loads(json.dumps(result.counts))
    assert [f["name"] for f in on_disk["figures"]] == [f.name for f in result.figures]


def test_html_shows_every_figure_and_escapes_text(run_settings: Settings, tmp_path: Path) -> None:
    result = build_report(run_settings, tmp_path / "report", seeds_nll=False)
    page = result.html.read_text(encoding="utf-8")
    for fig in result.figures:
        assert f'<img src="{fig.file}"' in page
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    assert "snap-00001-20260101T000000Z" in page  # the evaluation table
    assert str(run_settings.state_path) in page


def test_first_decisions_prefers_the_first_non_replayed() -> None:
    records = [
        {"turn_id": "a", "replayed": True, "reason": "duplicate"},
        {"turn_id": "b", "replayed": False, "reason": "accepted"},
        {"turn_id": "a", "replayed": False, "reason": "accepted"},
        {"turn_id": "a", "replayed": False, "reason": "low_quality"},
        {"turn_id": "c", "replayed": True, "reason": "empty"},
    ]
    got = {d["turn_id"]: d["reason"] for d in first_decisions(records)}
    # c has only a replay: it stands in for the first decision it repeats.
    assert got == {"a": "accepted", "b": "accepted", "c": "empty"}


@pytest.mark.parametrize(
    ("span", "expected"),
    [(0.0, (1.0, 1)), (29.0, (1.0, 30)), (30.0, (2.0, 16)), (3600.0, (300.0, 13))],
)
def test_time_bins_follow_the_span(span: float, expected: tuple[float, int]) -> None:
    assert time_bins(span) == expected


def test_a_store_without_decisions_reports_no_data(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    write_store(s, [], [])
    out = tmp_path / "report"
    out.mkdir()
    (out / "cosine_hist.png").write_bytes(PNG_SIGNATURE)  # left by an earlier report
    result = build_report(s, out, seeds_nll=False)
    assert result.figures == []
    assert set(result.missing) == {
        "nll_by_corpus",
        "acceptance_over_time",
        "cosine_hist",
        "evaluation",
    }
    assert not list(out.glob("*.png"))
    page = result.html.read_text(encoding="utf-8")
    assert "<img" not in page
    assert page.count("Not drawn:") == 4
    assert "no decisions" in page
    assert result.counts["decisions"]["turns"] == 0
    assert result.counts["decisions"]["acceptance_rate"] is None
    assert not s.snapshots_path.exists()  # reading never creates state


def test_a_missing_store_is_a_note_not_a_crash(tmp_path: Path) -> None:
    result = build_report(settings_for(tmp_path), tmp_path / "report", seeds_nll=False)
    assert result.figures == []
    assert any(n.startswith("no corpus: ") for n in result.notes)
    assert "no corpus: " in result.html.read_text(encoding="utf-8")


def test_cli_report_prints_the_result_as_json(
    run_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-report"
    argv = ["report", "--state-dir", run_settings.state_dir, "--out", str(out)]
    assert main([*argv, "--no-seeds", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["html"] == str(out.resolve() / "index.html")
    series = {f["name"]: f["series"] for f in printed["figures"]}
    assert series["cosine_hist"] == {"searched": 3}
    assert (out / "index.html").is_file()


SEEDS = [
    ["Come si prepara il caffè con la moka?", "Riempi la caldaia d'acqua fino alla valvola."],
    ["Che tempo fa oggi a Roma?", "Grazie mille!"],
    [
        "Mi consigli un libro da leggere in vacanza?",
        "Prova un romanzo di Italo Calvino, per esempio Il barone rampante.",
        "Grazie mille!",  # the same text again: scored once
        "Prego, buona lettura e buone vacanze.",
    ],
]


def test_seed_series_has_one_point_per_seed_message(
    demo_models: DemoModels, tmp_path: Path
) -> None:
    seed_file = tmp_path / "seeds.jsonl"
    with seed_file.open("w", encoding="utf-8") as fh:
        for i, texts in enumerate(SEEDS):
            turns = [{"role": ("user", "assistant")[j % 2], "text": t} for j, t in enumerate(texts)]
            fh.write(json.dumps({"id": f"s{i}", "messages": turns}, ensure_ascii=False) + "\n")
    s = settings_for(
        tmp_path,
        models={"models_dir": str(demo_models.root.parent)},
        producer={"seed_file": str(seed_file), "seed_format": "jsonl"},
    )
    write_store(s, [], [])
    result = build_report(s, tmp_path / "report", seeds_nll=True)
    messages = seed_messages(load_seeds(s.producer.seed_file, s.producer.seed_format))
    assert len(messages) == 7
    assert result.figure("nll_by_corpus").series == {"seeds": 7}
    seeds = result.counts["nll"]["seeds"]
    assert seeds["n"] == 7 and 0.0 < seeds["p10"] <= seeds["p90"] < 20.0
    assert_png(tmp_path / "report" / "nll_by_corpus.png")
    assert "seed messages not scored" not in result.html.read_text(encoding="utf-8")


def test_report_help_names_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--no-seeds", "--json", "--config", "--state-dir"):
        assert option in out
