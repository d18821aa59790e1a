"""SQuAD-it k-shot evaluation: loading, subsets, shots, prompts, fitting, scoring, end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.chatformat import ChatFormat
from corpusfactory.engines.models.demo import DemoModels
from training.evaluation.lm import CausalLM
from training.evaluation.squad_it import (
    PREDICTIONS_FILE,
    ShotSampler,
    SquadItem,
    build_prompt,
    evaluate_squad_it,
    fit_prompt,
    load_squad,
    rescore_predictions,
    select_items,
)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "squad_it_small.json"
FMT = ChatFormat()


@pytest.fixture(scope="module")
def lm(demo_models: DemoModels) -> CausalLM:
    return CausalLM.load(demo_models.generator, batch_size=4)


def _squad(paragraphs: list[tuple[str, list[tuple[str, str, list[str]]]]]) -> dict[str, Any]:
    """A SQuAD v1.1 document with one article holding ``paragraphs``."""
    paras = [
        {
            "context": ctx,
            "qas": [
                {"id": qid, "question": q, "answers": [{"text": a, "answer_start": 0} for a in ans]}
                for qid, q, ans in qas
            ],
        }
        for ctx, qas in paragraphs
    ]
    return {"version": "1.1", "data": [{"title": "Prova", "paragraphs": paras}]}


# --- loading ------------------------------------------------------------------------------------


def test_load_reads_plain_json() -> None:
    items = load_squad(FIXTURE)
    assert len(items) == 12
    assert [it.id for it in items] == [f"sq-{i:03d}" for i in range(1, 13)]
    assert items[1] == SquadItem(
        id="sq-002",
        title="Roma",
        context=items[0].context,
        question="Chi fondò Roma secondo la leggenda?",
        answers=("Romolo", "da Romolo"),
    )


def test_load_reads_gzipped_json(tmp_path: Path) -> None:
    gz = tmp_path / "squad.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(FIXTURE.read_text(encoding="utf-8"))
    assert load_squad(gz) == load_squad(FIXTURE)


GOOD_QA = {"id": "q1", "question": "Chi?", "answers": [{"text": "Io", "answer_start": 0}]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"version": "1.1"}, "top level has no 'data'"),
        ([1, 2], "top level has no 'data'"),
        ({"data": [{"title": "T"}]}, "data[0] has no 'paragraphs'"),
        ({"data": [{"title": "T", "paragraphs": [{"qas": [GOOD_QA]}]}]}, "has no 'context'"),
        ({"data": [{"title": "T", "paragraphs": [{"context": 3, "qas": []}]}]}, "not a str"),
        (
            {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "q1"}]}]}]},
            "qas[0] has no 'question'",
        ),
        (_squad([("c", [("q1", "Chi?", [])])]), "question 'q1' (data[0].paragraphs[0].qas[0])"),
        (
            _squad([("c", [("q1", "Chi?", ["a"])]), ("d", [("q1", "Cosa?", ["b"])])]),
            "id 'q1' appears more than once",
        ),
    ],
)
def test_load_rejects_malformed_files(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_squad(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_load_rejects_text_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read SQuAD JSON") as err:
        load_squad(path)
    assert str(path) in str(err.value)


# --- subsets ------------------------------------------------------------------------------------


def test_select_items_is_deterministic_sized_ordered_and_seeded() -> None:
    items = load_squad(FIXTURE)
    assert select_items(items, None, 0) == items
    assert select_items(items, 50, 0) == items
    assert select_items(items, 0, 0) == []
    subset = select_items(items, 5, seed=7)
    assert len(subset) == 5
    assert select_items(items, 5, seed=7) == subset
    positions = [items.index(it) for it in subset]
    assert positions == sorted(positions)  # original order kept
    assert any(select_items(items, 5, seed=s) != subset for s in range(8, 13))
    with pytest.raises(ValueError, match="limit"):
        select_items(items, -1, 0)


# --- shots and prompts --------------------------------------------------------------------------


def test_shots_come_from_other_distinct_paragraphs_deterministically() -> None:
    items = load_squad(FIXTURE)  # 5 paragraphs
    for seed in range(5):
        sampler = ShotSampler(items, seed)
        for item in items:
            shots = sampler.choose(item, 3)
            assert len(shots) == 3
            contexts = {s.context for s in shots}
            assert item.context not in contexts
            assert len(contexts) == 3  # one question per paragraph
            assert ShotSampler(items, seed).choose(item, 3) == shots
    # Asking for more shots than there are other paragraphs gives one from each of them.
    assert len(ShotSampler(items, 0).choose(items[0], 10)) == 4
    assert len({tuple(ShotSampler(items, s).choose(items[0], 2)) for s in range(10)}) > 1
    # A pool of one paragraph has nothing to offer.
    same = [it for it in items if it.context == items[0].context]
    assert ShotSampler(same, 0).choose(same[0], 3) == []


def test_prompt_layout_is_exact() -> None:
    item = SquadItem("q1", "Po", "Il Po nasce  dal\nMonviso.", "Da dove nasce il Po?", ("Monviso",))
    shot1 = SquadItem("s1", "Dante", "Dante nacque a Firenze.", "Dove nacque Dante?", ("Firenze",))
    shot2 = SquadItem("s2", "Roma", "Roma fu fondata nel 753.", "Quando?", ("", "nel 753"))
    expected = (
        "[|Umano|] Contesto: Dante nacque a Firenze.\nDomanda: Dove nacque Dante?\n"
        "[|Assistente|] Firenze\n"
        "\n"
        "[|Umano|] Contesto: Roma fu fondata nel 753.\nDomanda: Quando?\n"
        "[|Assistente|] nel 753\n"  # the first non-empty gold answer
        "\n"
        "[|Umano|] Contesto: Il Po nasce dal Monviso.\nDomanda: Da dove nasce il Po?\n"
        "[|Assistente|]"
    )
    assert build_prompt(item, [shot1, shot2], FMT) == expected
    assert build_prompt(item, [], FMT) == (
        "[|Umano|] Contesto: Il Po nasce dal Monviso.\nDomanda: Da dove nasce il Po?\n"
        "[|Assistente|]"
    )


# --- fitting the model's context (real demo generator, 512 positions) ----------------------------


def _long(word: str, n: int) -> str:
    return " ".join(f"{word}{i % 10}" for i in range(n))


def test_shots_are_dropped_until_the_prompt_fits(lm: CausalLM) -> None:
    item = load_squad(FIXTURE)[0]
    shots = [
        SquadItem(f"l{i}", "Lungo", _long("fiume", 60), "Domanda?", ("fiume1",)) for i in range(3)
    ]
    assert not lm.fits(build_prompt(item, shots, FMT), 32)
    prompt, used, truncated = fit_prompt(lm, item, shots, FMT, 32)
    assert 0 < used < 3 and not truncated
    assert prompt == build_prompt(item, shots[:used], FMT)
    assert lm.fits(prompt, 32)
    assert not lm.fits(build_prompt(item, shots[: used + 1], FMT), 32)  # the most that fit


def test_a_context_too_long_even_alone_is_truncated(lm: CausalLM) -> None:
    items = load_squad(FIXTURE)
    huge = SquadItem("h", "Lungo", _long("parola", 600), "Domanda?", ("parola1",))
    prompt, used, truncated = fit_prompt(lm, huge, items[:3], FMT, 32)
    assert (used, truncated) == (0, True)
    assert prompt == build_prompt(huge, [], FMT)


def test_evaluation_counts_reduced_and_truncated_items(lm: CausalLM, tmp_path: Path) -> None:
    doc = _squad(
        [
            ("Il Po nasce dal Monviso.", [("a", "Da dove nasce il Po?", ["dal Monviso"])]),
            ("Dante nacque a Firenze.", [("b", "Dove nacque Dante?", ["Firenze"])]),
            (_long("parola", 600), [("c", "Quale parola?", ["parola1"])]),
        ]
    )
    src = tmp_path / "long.json"
    src.write_text(json.dumps(doc), encoding="utf-8")
    result = evaluate_squad_it(lm, src, tmp_path / "out", shots=2, max_new_tokens=8)
    # "c" alone overflows (truncated); "a" and "b" cannot fit "c" as a shot, so all are reduced.
    assert (result["n"], result["shots_reduced"], result["truncated"]) == (3, 3, 1)


# --- end to end ---------------------------------------------------------------------------------


def test_end_to_end_with_the_demo_generator(lm: CausalLM, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = evaluate_squad_it(lm, FIXTURE, out, shots=3, limit=8, seed=1, max_new_tokens=16)
    assert set(result) == {
        *("task", "f1", "em", "f1_it", "em_it", "n", "shots", "limit", "seed"),
        *("shots_reduced", "truncated", "predictions", "seconds"),
    }
    assert json.loads(json.dumps(result)) == result
    assert (result["task"], result["n"], result["shots"], result["limit"], result["seed"]) == (
        "squad_it",
        8,
        3,
        8,
        1,
    )
    assert result["truncated"] == 0
    path = Path(result["predictions"])
    assert path.is_absolute() and path == (out / PREDICTIONS_FILE).resolve()
    assert sorted(p.name for p in out.iterdir()) == [PREDICTIONS_FILE]  # no temp file left
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    expected = select_items(load_squad(FIXTURE), 8, 1)
    assert [r["id"] for r in rows] == [it.id for it in expected]
    assert [r["answers"] for r in rows] == [list(it.answers) for it in expected]
    assert all(isinstance(r["prediction"], str) and "\n" not in r["prediction"] for r in rows)
    for key in ("f1", "em", "f1_it", "em_it"):
        assert 0.0 <= result[key] <= 100.0
    rescored = rescore_predictions(path)
    assert rescored == {k: result[k] for k in ("f1", "em", "f1_it", "em_it", "n")}
    # Same arguments, same predictions: greedy decoding and seeded choices are deterministic.
    again = evaluate_squad_it(lm, FIXTURE, out, shots=3, limit=8, seed=1, max_new_tokens=16)
    assert (
        Path(again["predictions"]).read_text(encoding="utf-8")
        == "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    )


# --- scoring by hand ----------------------------------------------------------------------------


def test_rescore_matches_hand_computed_scores(tmp_path: Path) -> None:
    rows = [
        # official: "la torre di pisa" vs "torre di pisa": EM 0, P 3/4 R 1 -> F1 6/7;
        # Italian: "la" dropped -> EM 1, F1 1.
        {"id": "1", "prediction": "la Torre di Pisa", "answers": ["Torre di Pisa"]},
        # official: best gold "1492": EM 0, P 1/2 R 1 -> F1 2/3; Italian: "nel" dropped -> 1, 1.
        {"id": "2", "prediction": "nel 1492", "answers": ["1492", "ottobre 1492"]},
        # both: "dante alighieri" vs "dante": EM 0, P 1/2 R 1 -> F1 2/3.
        {"id": "3", "prediction": "Dante Alighieri.", "answers": ["Dante"]},
        # both: nothing shared -> 0, 0.
        {"id": "4", "prediction": "Milano", "answers": ["Roma"]},
        # official: "litalia" vs "italia" -> 0, 0; Italian: elided "l'" dropped -> 1, 1.
        {"id": "5", "prediction": "l'Italia", "answers": ["Italia"]},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    scores = rescore_predictions(path)
    # F1 = (6/7 + 2/3 + 2/3 + 0 + 0) / 5 = 46/105; F1_it = (1 + 1 + 2/3 + 0 + 1) / 5 = 11/15.
    assert scores == {
        "f1": pytest.approx(100 * 46 / 105),
        "em": 0.0,
        "f1_it": pytest.approx(100 * 11 / 15),
        "em_it": pytest.approx(60.0),
        "n": 5,
    }


def test_rescore_rejects_repeated_ids(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    row = json.dumps({"id": "1", "prediction": "a", "answers": ["a"]})
    path.write_text(f"{row}\n{row}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="more than once"):
        rescore_predictions(path)


def test_scorer_heldout_articles_only() -> None:
    from corpusfactory.engines.models.italian_data import is_heldout_article
    from corpusfactory.settings import SQUAD_IT_SHIPPED
    from training.evaluation.squad_it import article_filter

    items = load_squad(SQUAD_IT_SHIPPED)
    keep = article_filter("scorer_heldout")
    assert article_filter("all") is None and keep is is_heldout_article
    chosen = select_items(items, 40, 3, keep)
    assert len(chosen) == 40 and all(is_heldout_article(i.title) for i in chosen)
    # some of the shipped articles are held out, most are not
    titles = {i.title for i in items}
    held = {t for t in titles if is_heldout_article(t)}
    assert 0 < len(held) < len(titles) / 2
    with pytest.raises(ValueError, match="squad_it_articles"):
        article_filter("some")
