"""EVALITA readers, shot selection, prompts, and rank classification with the real demo LM."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from corpusfactory.chatformat import ChatFormat
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.errors import InputFileError
from training.evaluation.evalita import TASKS, build_prompt, evaluate_evalita, select_shots
from training.evaluation.evalita_files import (
    LAYOUTS,
    EvalitaFileError,
    Example,
    read_ami2020,
    read_ironita2018,
    read_sentipolc2014,
)
from training.evaluation.lm import CausalLM
from training.evaluation.metrics import classification_scores

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evalita"
FILES = {
    "ami2020": ("ami2020_train.tsv", "ami2020_test.tsv"),
    "ironita2018": ("ironita2018_train.csv", "ironita2018_test.csv"),
    "sentipolc2014": ("sentipolc2014_train.csv", "sentipolc2014_test.csv"),
}
# The same records as FILES, both splits in one file (rows of the two splits interleaved):
# AMI comma-separated, IronITA semicolon-separated with its columns in another order and
# labels written True/False, SENTIPOLC tab-separated with every 0/1 column as TRUE/FALSE.
SINGLE = {
    "ami2020": "ami2020_single.csv",
    "ironita2018": "ironita2018_single.csv",
    "sentipolc2014": "sentipolc2014_single.tsv",
}


def _paths(task: str) -> tuple[Path, Path]:
    train, test = FILES[task]
    return FIXTURES / train, FIXTURES / test


# --- readers ----------------------------------------------------------------------------------


def test_ami2020_reader_rows_labels_and_quoted_newline_and_tab() -> None:
    rows = read_ami2020(FIXTURES / "ami2020_train.tsv")
    assert [r.id for r in rows] == [f"a{i}" for i in range(1, 13)]
    # misogynous = 1 on a1, a3, a5, a7, a9, a11.
    assert [r.label for r in rows] == ["misogynous", "non_misogynous"] * 6
    assert rows[0].text == "Le donne non dovrebbero guidare, fanno solo danni."
    assert rows[7].text == "Riunione alle 9.\nPortate i documenti, grazie."  # quoted newline
    assert rows[9].text == "Mia sorella ha finito il dottorato in fisica:\tsono orgoglioso."
    assert Counter(r.label for r in read_ami2020(FIXTURES / "ami2020_test.tsv")) == {
        "misogynous": 5,
        "non_misogynous": 5,
    }


def test_ironita2018_reader_handles_semicolons_doubled_quotes_newlines() -> None:
    rows = read_ironita2018(FIXTURES / "ironita2018_train.csv")
    assert len(rows) == 12
    assert [r.label for r in rows] == ["ironic", "non_ironic"] * 6
    assert rows[2].text == "Grazie governo; ora sì che le scuole funzionano benissimo."
    assert rows[9].text == 'Il ministro ha detto "faremo presto" e ha lasciato la sala.'
    assert rows[11] == Example(
        "i12", "Nuovo orario dei bus;\nla linea 5 passa ogni 15 minuti.", "non_ironic"
    )
    assert len(read_ironita2018(FIXTURES / "ironita2018_test.csv")) == 10


def test_sentipolc2014_reader_maps_opos_oneg_to_polarity() -> None:
    rows = read_sentipolc2014(FIXTURES / "sentipolc2014_train.csv")
    # (opos, oneg): (1,0) positive, (0,1) negative, (0,0) neutral, (1,1) mixed.
    assert [r.label for r in rows] == ["positive", "negative", "neutral", "mixed"] * 3
    assert rows[0] == Example("100001", "Bellissima giornata al mare, mi sento rinato!", "positive")
    assert rows[11].text == "Cena buonissima, servizio lentissimo, conto salato.\nTornerò? Forse."
    test = read_sentipolc2014(FIXTURES / "sentipolc2014_test.csv")
    assert Counter(r.label for r in test) == {
        "positive": 3,
        "negative": 3,
        "neutral": 2,
        "mixed": 2,
    }


def test_bom_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.tsv"
    path.write_text(
        "\ufeffid\ttext\tmisogynous\taggressiveness\n\nx1\tciao\t0\t0\n\n", encoding="utf-8"
    )
    assert read_ami2020(path) == [Example("x1", "ciao", "non_misogynous")]


HEADER = '"id";"text";"irony";"sarcasm";"topic"\n'


@pytest.mark.parametrize(
    ("content", "where", "message"),
    [
        ('"id";"testo";"irony";"sarcasm";"topic"\n', 1, "not a ironita2018 file"),
        # The first record spans lines 2-3, so the bad one starts on line 4.
        (HEADER + '"1";"a\nb";"0";"0";"x"\n"2";"c";"2";"0";"x"\n', 4, "irony must be 0 or 1"),
        (HEADER + '"1";"ok";"1";"0";"x"\n"2";"  ";"0";"0";"x"\n', 3, "empty text"),
        (HEADER + '"1";"ok";"1";"0"\n', 2, "expected 5 fields, got 4"),
        ("", 1, "empty file"),
    ],
)
def test_bad_files_are_rejected_with_line_numbers(
    tmp_path: Path, content: str, where: int, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EvalitaFileError, match=rf"bad\.csv:{where}: .*{message}"):
        read_ironita2018(path)


def test_a_file_in_another_layout_names_the_file_and_the_layout(tmp_path: Path) -> None:
    # An AMI file given as the SENTIPOLC test set: the header check says what was expected.
    path = tmp_path / "sentipolc_test.csv"
    path.write_text((FIXTURES / "ami2020_test.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(InputFileError) as caught:
        read_sentipolc2014(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:1: not a sentipolc2014 file")
    assert "comma-separated" in message and "'idtwitter'" in message and "'oneg'" in message
    assert "\n" not in message
    with pytest.raises(EvalitaFileError, match="cannot open the ami2020 file"):
        read_ami2020(tmp_path / "missing.tsv")


def test_sentipolc_bad_polarity_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    header = '"idtwitter","subj","opos","oneg","iro","lpos","lneg","top","text"\n'
    path.write_text(header + '"1","1","1","x","0","0","0","0","testo"\n', encoding="utf-8")
    with pytest.raises(EvalitaFileError, match=r"bad\.csv:2: oneg must be 0 or 1, got 'x'"):
        read_sentipolc2014(path)


# --- layouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_single_file_gives_the_records_of_the_official_files(task: str) -> None:
    reader = TASKS[task].reader
    train, test = (reader(p) for p in _paths(task))
    single = FIXTURES / SINGLE[task]
    assert reader(single, "train") == train
    assert reader(single, "test") == test
    # No split: every row, in file order; the fixture interleaves the splits.
    every = reader(single)
    assert len(every) == len(train) + len(test) == 22
    assert [ex for ex in every if ex in train] == train
    assert [ex for ex in every if ex in test] == test
    assert every[:3] == [train[0], train[1], test[0]]
    # An official file is one split, whatever split is asked for.
    assert reader(_paths(task)[0], "test") == train


def test_sentipolc_2014_and_2016_layouts_quoted_or_not_give_the_same_records() -> None:
    # 2014: no lpos/lneg columns, CRLF, fields unquoted, so texts show bare commas.
    layout_2014 = FIXTURES / "sentipolc_official2014_train.csv"
    raw = layout_2014.read_bytes().decode("utf-8")
    assert raw.startswith("idtwitter,subj,opos,oneg,iro,top,text\r\n")
    assert "0,Bellissima giornata al mare, mi sento rinato!\r\n" in raw
    official_train = read_sentipolc2014(FIXTURES / "sentipolc2014_train.csv")  # 2016, quoted
    assert read_sentipolc2014(layout_2014) == official_train
    # 2016 unquoted (header included).
    unquoted = FIXTURES / "sentipolc_official2016_unquoted_test.csv"
    assert unquoted.read_text(encoding="utf-8").startswith("idtwitter,subj,opos,oneg,iro,lpos,")
    official_test = read_sentipolc2014(FIXTURES / "sentipolc2014_test.csv")
    assert read_sentipolc2014(unquoted) == official_test
    # 2016 columns without a header line: the first line is already a record.
    headerless = FIXTURES / "sentipolc_official2016_noheader_test.csv"
    assert headerless.read_text(encoding="utf-8").startswith('"200001","1","1","0",')
    assert read_sentipolc2014(headerless) == official_test


def test_a_headerless_sentipolc_file_counts_its_lines_from_the_first(tmp_path: Path) -> None:
    path = tmp_path / "gold.csv"
    path.write_text("1,1,0,0,0,0,0,0,bello\n2,1,0,2,0,0,0,0,brutto\n", encoding="utf-8")
    with pytest.raises(EvalitaFileError, match=re.escape(f"{path}:2: oneg must be 0 or 1")):
        read_sentipolc2014(path)


def test_header_names_are_compared_stripped_and_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "ami.tsv"
    path.write_text(" ID\tText \tMISOGYNOUS\tAggressiveness\nx1\tciao a tutti\t1\t0\n", "utf-8")
    assert read_ami2020(path) == [Example("x1", "ciao a tutti", "misogynous")]
    path = tmp_path / "iron.csv"
    path.write_text("Text;ID;Set;Irony\nche bello;y1;TEST;true\n", "utf-8")
    assert read_ironita2018(path, "test") == [Example("y1", "che bello", "ironic")]


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize(
    "header",
    [
        "id,testo,etichetta",
        # The task's columns in a single file, but no set column.
        "id,idtwitter,text,misogynous,irony,opos,oneg",
        # A set column, but the single file's label columns are missing.
        "id\tidtwitter\ttext\tset",
    ],
)
def test_a_header_in_no_layout_gives_one_line_naming_the_file_and_the_layouts(
    tmp_path: Path, task: str, header: str
) -> None:
    path = tmp_path / "mystery.csv"
    path.write_text(f"\n\n{header}\n1,ciao,TRUE\n", encoding="utf-8")
    with pytest.raises(EvalitaFileError) as caught:
        TASKS[task].reader(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: not a {task} file: its header {header!r} is in no")
    assert "\n" not in message
    assert all(layout.describe() in message for layout in LAYOUTS[task])
    assert "single file: comma-, semicolon- or tab-separated" in message
    assert "set train or test, labels TRUE/FALSE" in message
    expected = {
        "ami2020": ["AMI 2020 official: tab-separated"],
        "ironita2018": ["IronITA 2018 official: semicolon-separated"],
        "sentipolc2014": [
            "SENTIPOLC 2016 official: comma-separated, quoted or not, header ['idtwitter', "
            "'subj', 'opos', 'oneg', 'iro', 'lpos', 'lneg', 'top', 'text']",
            "SENTIPOLC 2014 official: comma-separated, quoted or not, header ['idtwitter', "
            "'subj', 'opos', 'oneg', 'iro', 'top', 'text']",
        ],
    }[task]
    assert all(fragment in message for fragment in expected)


SINGLE_HEADER = "id,text,misogynous,set\n"


@pytest.mark.parametrize(
    ("content", "split", "message"),
    [
        (
            SINGLE_HEADER + "a,uno,TRUE,train\nb,due,1,test\n",
            None,
            r":3: misogynous must be TRUE or FALSE, got '1'",
        ),
        (
            SINGLE_HEADER + "a,uno,TRUE,train\nb,due,FALSE,dev\n",
            None,
            r":3: set must be train or test, got 'dev'",
        ),
        (SINGLE_HEADER + "a,uno,TRUE,train\nb,,FALSE,test\n", "train", r":3: empty text"),
        (SINGLE_HEADER + "a,uno,TRUE,train\nb,due,FALSE,train\n", "test", r": no test rows"),
    ],
)
def test_bad_single_files_are_rejected(
    tmp_path: Path, content: str, split: str | None, message: str
) -> None:
    path = tmp_path / "single.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EvalitaFileError, match=re.escape(str(path)) + message):
        read_ami2020(path, split)


def test_a_split_other_than_train_or_test_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="split must be"):
        read_ami2020(FIXTURES / SINGLE["ami2020"], "dev")


# --- shots and prompt -------------------------------------------------------------------------


def test_shot_selection_is_deterministic_and_balanced() -> None:
    train = read_sentipolc2014(FIXTURES / "sentipolc2014_train.csv")
    labels = TASKS["sentipolc2014"].labels
    first = select_shots(train, 5, 7, labels)
    assert first == select_shots(train, 5, 7, labels)
    # 5 shots over 4 labels: one label twice, the others once.
    assert sorted(Counter(s.label for s in first).values()) == [1, 1, 1, 2]
    assert len({tuple(s.id for s in select_shots(train, 5, seed, labels)) for seed in range(5)}) > 1
    ami = read_ami2020(FIXTURES / "ami2020_train.tsv")
    for seed in range(10):
        counts = Counter(s.label for s in select_shots(ami, 5, seed, TASKS["ami2020"].labels))
        assert sorted(counts.values()) == [2, 3]


def test_shot_selection_with_a_scarce_label_and_too_few_examples() -> None:
    train = [Example("p", "t", "ironic")] + [Example(f"n{i}", "t", "non_ironic") for i in range(9)]
    shots = select_shots(train, 5, 0, TASKS["ironita2018"].labels)
    # Only one ironic example exists, so the other four come from non_ironic.
    assert Counter(s.label for s in shots) == {"ironic": 1, "non_ironic": 4}
    assert len(select_shots(train[:3], 5, 0, TASKS["ironita2018"].labels)) == 3
    assert select_shots(train, 0, 0, TASKS["ironita2018"].labels) == []


def test_exact_prompt_for_a_hand_made_case() -> None:
    spec = TASKS["ami2020"]
    shots = [Example("1", "Frase uno.", "misogynous"), Example("2", "Frase due.", "non_misogynous")]
    expected = (
        "[|Umano|] Il testo è misogino? Rispondi sì o no.\nTesto: Frase uno.\n"
        "[|Assistente|] sì\n\n"
        "[|Umano|] Il testo è misogino? Rispondi sì o no.\nTesto: Frase due.\n"
        "[|Assistente|] no\n\n"
        "[|Umano|] Il testo è misogino? Rispondi sì o no.\nTesto: Nuova frase.\n"
        "[|Assistente|]"
    )
    assert build_prompt(spec, shots, "Nuova frase.", ChatFormat()) == expected


# --- end to end with the demo generator -------------------------------------------------------


@pytest.fixture(scope="module")
def lm(demo_models: DemoModels) -> CausalLM:
    return CausalLM.load(demo_models.generator)


def _read_predictions(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_end_to_end_predictions_match_metrics(lm: CausalLM, task: str, tmp_path: Path) -> None:
    train, test = _paths(task)
    result = evaluate_evalita(lm, task, train, test, tmp_path)
    spec = TASKS[task]
    assert result["task"] == task and result["n"] == 10 and result["shots"] == 5
    assert result["labels"] == list(spec.labels)
    assert result["shots_reduced"] == 0 and result["truncated"] == 0  # 512 positions suffice
    assert result["predictions"] == str((tmp_path / f"{task}.predictions.jsonl").resolve())
    rows = _read_predictions(result["predictions"])
    assert [r["id"] for r in rows] == [ex.id for ex in spec.reader(test)]
    for row in rows:
        assert set(row["scores"]) == set(spec.labels)
        assert all(math.isfinite(v) and v < 0 for v in row["scores"].values())
        assert row["prediction"] == max(spec.labels, key=lambda lab: row["scores"][lab])
    again = classification_scores(
        [r["label"] for r in rows], [r["prediction"] for r in rows], labels=spec.labels
    )
    assert result["macro_f1"] == pytest.approx(100 * again["macro_f1"])
    assert result["accuracy"] == pytest.approx(100 * again["accuracy"])
    for label in spec.labels:
        assert result["per_label"][label]["f1"] == pytest.approx(
            100 * again["per_label"][label]["f1"]
        )
    assert 0 <= result["macro_f1"] <= 100 and result["seconds"] > 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_single_file_as_train_and_test_scores_like_the_official_pair(
    lm: CausalLM, task: str, tmp_path: Path
) -> None:
    # Its train rows give the shots, its test rows the items: the same prompts, the same scores.
    train, test = _paths(task)
    single = FIXTURES / SINGLE[task]
    official = evaluate_evalita(lm, task, train, test, tmp_path / "official", limit=4)
    one_file = evaluate_evalita(lm, task, single, single, tmp_path / "single", limit=4)
    assert one_file["n"] == 4 and one_file["shots"] == 5
    assert _read_predictions(one_file["predictions"]) == _read_predictions(official["predictions"])
    assert one_file["macro_f1"] == official["macro_f1"]


def test_limit_picks_a_deterministic_subset(lm: CausalLM, tmp_path: Path) -> None:
    train, test = _paths("ironita2018")
    a = evaluate_evalita(lm, "ironita2018", train, test, tmp_path / "a", limit=4, seed=3)
    b = evaluate_evalita(lm, "ironita2018", train, test, tmp_path / "b", limit=4, seed=3)
    rows_a, rows_b = _read_predictions(a["predictions"]), _read_predictions(b["predictions"])
    assert a["n"] == 4 and rows_a == rows_b
    assert {r["id"] for r in rows_a} <= {ex.id for ex in read_ironita2018(test)}


def test_short_context_drops_shots_then_truncates(lm: CausalLM, tmp_path: Path) -> None:
    spec = TASKS["ami2020"]
    train, test = _paths("ami2020")
    items = read_ami2020(test)
    answer = max(lm.count_tokens(" " + v) for v in spec.verbalisations.values())
    bare = max(lm.count_tokens(build_prompt(spec, [], ex.text)) for ex in items)
    small = CausalLM(lm.model, lm.tokenizer, lm.name)
    # Room for the bare question of every item, but not for five shots on top of it.
    small.max_length = bare + answer
    result = evaluate_evalita(small, "ami2020", train, test, tmp_path / "small")
    assert result["shots_reduced"] == 10 and result["truncated"] == 0
    small.max_length = 10  # not even the question fits: cut on the left
    result = evaluate_evalita(small, "ami2020", train, test, tmp_path / "tiny")
    assert result["shots_reduced"] == 10 and result["truncated"] == 10
    assert result["n"] == 10


def test_unknown_task_and_bad_arguments(lm: CausalLM, tmp_path: Path) -> None:
    train, test = _paths("ami2020")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_evalita(lm, "haspeede", train, test, tmp_path)
    with pytest.raises(ValueError, match="limit"):
        evaluate_evalita(lm, "ami2020", train, test, tmp_path, limit=0)
