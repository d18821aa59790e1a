"""The ingest refinement (method.md §4): readers, every rule's count, and bad input.

The fixtures under ``tests/fixtures/ingest/`` plant a defect for every rule; the
comment above each test says, record by record, why every count is what it is.
Language checks run the real Lingua detector (``corpusfactory.engines.language``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.chatformat import Message
from corpusfactory.cli.main import main
from corpusfactory.engines.language import LanguageCheck
from corpusfactory.errors import ConfigError, UsageError
from producers.ingest import (
    IngestError,
    RawConversation,
    RefinedConversation,
    Refiner,
    fix_tags,
    read_conversations,
    refine_file,
    split_transcript,
)
from producers.ingest.formats import Turn
from producers.ingest.refine import LanguageJudge, strip_code

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ingest"
KEYS = [
    "input_conversations",
    "tags_fixed",
    "dropped_empty",
    "dropped_bad_alternation",
    "dropped_duplicate_heavy",
    "dropped_non_target",
    "system_prompts_removed",
    "non_target_language_messages",
    "cut_non_target_messages",
    "output_conversations",
]
DROPS = (
    "dropped_empty",
    "dropped_bad_alternation",
    "dropped_duplicate_heavy",
    "dropped_non_target",
)


def pairs(convs: list[RefinedConversation]) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(c.id, [(m.role, m.text) for m in c.messages]) for c in convs]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def chats(path: Path, convs: list[list[str]]) -> Path:
    """A jsonl file, one conversation per list of texts (user, assistant, user, ...)."""
    lines = []
    for i, texts in enumerate(convs):
        msgs = [{"role": ("user", "assistant")[j % 2], "text": t} for j, t in enumerate(texts)]
        lines.append(json.dumps({"id": f"c{i}", "messages": msgs}, ensure_ascii=False))
    return write(path, "\n".join(lines) + "\n")


# -- Fauno (a JSON list) ---------------------------------------------------------------

# fauno.json, 16 records (#index), Italian, most with Baize's English system line:
#   #0  clean, 2 exchanges                                  -> kept (system line)
#   #1  5 broken tags: "[| Umano |]" "[ |AI|]" "[|umano|]" "[|AI]" "|Umano|]"
#                                                            -> kept (system line)
#   #2  2 broken tags: untranslated "[|Human|]", "[|AI |]"  -> kept (no system line)
#   #3  "[AI]" inside the text: prose, not a tag            -> kept (system line)
#   #4  only the end marker                                 -> dropped_empty
#   #5  blank turns; 1 broken tag "[| AI|]"                  -> dropped_empty
#   #6  starts with the AI                                   -> dropped_bad_alternation
#   #7  two user turns in a row; 1 broken tag "[|AI|"         -> dropped_bad_alternation
#   #8  "[AI]" is not a tag: one unanswered user turn        -> dropped_bad_alternation
#   #9  an empty assistant turn inside                      -> dropped_bad_alternation
#   #10 #0 again, other whitespace: 4/4 duplicated          -> dropped_duplicate_heavy
#   #11 3/4 duplicated (of #0 and #1)                        -> dropped_duplicate_heavy
#   #12 2/4 duplicated (of #0): exactly half                 -> kept (system line)
#   #13 English answer in the 2nd exchange: counted, kept    -> kept (system line), 1 non-target
#       (with cut_non_target: cut to the 1st exchange, 2 messages cut)
#   #14 English first question: counted, kept                -> kept (system line), 1 non-target
#       (with cut_non_target: cut to nothing, 2 messages cut -> dropped_non_target)
#   #15 "Good morning." is under 20 characters: not judged   -> kept (no system line)
FAUNO_REPORT = {  # the default: non-target messages are counted and kept
    "input_conversations": 16,
    "tags_fixed": 9,  # 5 (#1) + 2 (#2) + 1 (#5) + 1 (#7): dropped records count too
    "dropped_empty": 2,  # #4, #5
    "dropped_bad_alternation": 4,  # #6, #7, #8, #9
    "dropped_duplicate_heavy": 2,  # #10, #11 (the first copy, #0, stays)
    "dropped_non_target": 0,  # nothing is cut by default
    "system_prompts_removed": 6,  # survivors with a system line: #0 #1 #3 #12 #13 #14
    "non_target_language_messages": 2,  # #13's answer, #14's question
    "cut_non_target_messages": 0,
    "output_conversations": 8,  # #0 #1 #2 #3 #12 #13 #14 #15
}
FAUNO_CUT_REPORT = {  # cut_non_target=True: same judgements, #13 shortened, #14 dropped
    **FAUNO_REPORT,
    "dropped_non_target": 1,  # #14
    "system_prompts_removed": 5,  # #14's went with it
    "cut_non_target_messages": 4,  # #13's 2nd exchange, #14's only exchange
    "output_conversations": 7,
}
RISOTTO = [
    ("user", "Come si prepara il risotto alla milanese?"),
    (
        "assistant",
        "Si tosta il riso nel burro, si sfuma con il vino bianco e si cuoce aggiungendo "
        "brodo caldo e zafferano.",
    ),
    ("user", "Quanto tempo di cottura serve?"),
    (
        "assistant",
        "Circa diciotto minuti, mescolando spesso e aggiungendo il brodo poco alla volta.",
    ),
]
FAUNO_KEPT = [
    ("fauno.json#0", RISOTTO),
    (
        "fauno.json#1",
        [
            ("user", "Qual è la capitale del Portogallo?"),
            (
                "assistant",
                "La capitale del Portogallo è Lisbona, affacciata sull'oceano Atlantico.",
            ),
            ("user", "E qual è la capitale della Spagna?"),
            ("assistant", "La capitale della Spagna è Madrid, al centro della penisola iberica."),
        ],
    ),
    (
        "fauno.json#2",
        [
            ("user", "Mi consigli un libro da leggere in vacanza?"),
            (
                "assistant",
                'Ti consiglio "Il barone rampante" di Italo Calvino, leggero e pieno di fantasia.',
            ),
        ],
    ),
    (
        "fauno.json#3",
        [
            (
                "user",
                "Nei miei appunti scrivo [AI] accanto a ogni paragrafo sull'intelligenza "
                "artificiale, è una buona idea?",
            ),
            (
                "assistant",
                "Sì, un'etichetta breve come [AI] rende gli appunti più facili da scorrere.",
            ),
        ],
    ),
    (
        "fauno.json#12",
        [
            RISOTTO[2],
            (
                "assistant",
                "Per il carnaroli bastano diciassette o diciotto minuti, per il vialone nano "
                "qualcuno in meno.",
            ),
            ("user", "Si può preparare il giorno prima?"),
            RISOTTO[3],
        ],
    ),
    (
        "fauno.json#13",
        [
            ("user", "Che differenza c'è tra un lago e uno stagno?"),
            (
                "assistant",
                "Un lago è più grande e profondo, uno stagno è piccolo e poco profondo.",
            ),
            ("user", "E perché alcuni laghi si trovano proprio in cima alle montagne?"),
            (
                "assistant",
                "Many mountain lakes were carved by glaciers, which left basins that later "
                "filled with meltwater.",
            ),
        ],
    ),
    (
        "fauno.json#14",
        [
            ("user", "What is the best season to visit Sicily?"),
            (
                "assistant",
                "La primavera è ideale: il clima è mite e le campagne sono in fiore.",
            ),
        ],
    ),
    (
        "fauno.json#15",
        [
            ("user", "Puoi tradurre la parola buongiorno in inglese?"),
            ("assistant", "Good morning."),
        ],
    ),
]
FAUNO_CUT_KEPT = [
    (cid, msgs[:2]) if cid == "fauno.json#13" else (cid, msgs)
    for cid, msgs in FAUNO_KEPT
    if cid != "fauno.json#14"
]


def test_fauno_counts_every_rule_and_keeps_exactly_these() -> None:
    kept, report = refine_file(FIXTURES / "fauno.json", "fauno")
    assert list(report) == KEYS
    assert report == FAUNO_REPORT
    assert pairs(kept) == FAUNO_KEPT
    assert {c.source for c in kept} == {"fauno"}
    assert kept[0].as_dict() == {
        "id": "fauno.json#0",
        "source": "fauno",
        "messages": [{"role": r, "text": t} for r, t in RISOTTO],
    }


def test_fauno_cutting_non_target_messages() -> None:
    # Same judgements (2 non-target messages); #13 loses its 2nd exchange, #14 is cut to
    # nothing and counted as dropped_non_target (not dropped_empty), its system line with it.
    kept, report = refine_file(FIXTURES / "fauno.json", "fauno", cut_non_target=True)
    assert list(report) == KEYS
    assert report == FAUNO_CUT_REPORT
    assert pairs(kept) == FAUNO_CUT_KEPT
    # The explicit default is the default.
    assert refine_file(FIXTURES / "fauno.json", "fauno", cut_non_target=False)[1] == FAUNO_REPORT


def test_jsonl_layout_is_detected_from_the_content(tmp_path: Path) -> None:
    # The same records, one per line, in a file still named .json: same result.
    records = json.loads((FIXTURES / "fauno.json").read_text(encoding="utf-8"))
    lines = "\n\n".join(json.dumps(r, ensure_ascii=False) for r in records)  # blank lines too
    f = write(tmp_path / "fauno.json", "\ufeff" + lines + "\n")
    kept, report = refine_file(f, "fauno")
    assert report == FAUNO_REPORT
    assert pairs(kept) == FAUNO_KEPT
    assert [c.line for c in read_conversations(f, "fauno")][:3] == [1, 3, 5]


# -- Baize (JSONL, English) -------------------------------------------------------

# baize.jsonl, 7 lines, English, target language "en":
#   #0 clean                                                 -> kept (system line)
#   #1 5 broken tags: "[|human|]" "[| AI |]" "[|Human |]" "|AI|]" "[|Human]"
#                                                            -> kept (system line)
#   #2 blank turns                                           -> dropped_empty
#   #3 the AI answers twice                                  -> dropped_bad_alternation
#   #4 #0 again: 2/2 duplicated                              -> dropped_duplicate_heavy
#   #5 Italian answer in the 2nd exchange                    -> kept (system line), 1 non-target
#      (with cut_non_target: cut to the 1st exchange, 2 messages cut)
#   #6 given id "baize-7", no system line                    -> kept
BAIZE_REPORT = {
    "input_conversations": 7,
    "tags_fixed": 5,
    "dropped_empty": 1,
    "dropped_bad_alternation": 1,
    "dropped_duplicate_heavy": 1,
    "dropped_non_target": 0,
    "system_prompts_removed": 3,  # #0 #1 #5
    "non_target_language_messages": 1,  # #5's Italian answer
    "cut_non_target_messages": 0,
    "output_conversations": 4,
}


def test_baize_counts_with_english_as_target() -> None:
    kept, report = refine_file(FIXTURES / "baize.jsonl", "baize", language="en")
    assert report == BAIZE_REPORT
    assert [c.id for c in kept] == ["baize.jsonl#0", "baize.jsonl#1", "baize.jsonl#5", "baize-7"]
    assert [m.role for m in kept[1].messages] == ["user", "assistant", "user", "assistant"]
    assert kept[1].messages[2] == Message("user", "Where is the mountain located?")
    assert len(kept[2].messages) == 4  # the Italian answer stays
    kept, report = refine_file(
        FIXTURES / "baize.jsonl", "baize", language="en", cut_non_target=True
    )
    assert report == {**BAIZE_REPORT, "cut_non_target_messages": 2}
    assert [c.id for c in kept] == ["baize.jsonl#0", "baize.jsonl#1", "baize.jsonl#5", "baize-7"]
    assert len(kept[2].messages) == 2


def test_baize_tags_are_not_fauno_tags() -> None:
    # "Umano" is no Baize tag name: left as text, so the turn never starts.
    assert fix_tags("[| Umano |] ciao", "baize") == ("[| Umano |] ciao", 0)


# -- OASST -----------------------------------------------------------------------------

# oasst.jsonl, 5 trees, 9 root-to-leaf paths (deleted a7 and its reply p8 are on none):
#   t1:a5 p1 a1 p2 a2 p5 a5                      -> kept
#   t1:a6 p1 a1 p2 a2 p6 a6: shares 4 messages with t1:a5, which are the same
#         messages, not copies: judged on p6 a6 only (by text it would be 4/6)  -> kept
#   t1:p3 p1 a1 p3: ends with the user           -> dropped_bad_alternation
#   t1:a3 p1 a3                                   -> kept
#   t1:a4 p1 a4, a4 declared "en"                 -> kept, 1 non-target
#         (with cut_non_target: cut to nothing, 2 messages cut -> dropped_non_target)
#   t2:b2 t1:a5's first 4 texts again: 4/4       -> dropped_duplicate_heavy
#   t3:c1 blank texts                             -> dropped_empty
#   t4:s2 a prompter answers the prompt           -> dropped_bad_alternation
#   t5:e4 no "lang": Lingua finds e3 English      -> kept, 1 non-target
#         (with cut_non_target: cut to the 1st exchange, 2 messages cut)
OASST_REPORT = {
    "input_conversations": 9,
    "tags_fixed": 0,
    "dropped_empty": 1,  # t3:c1
    "dropped_bad_alternation": 2,  # t1:p3, t4:s2
    "dropped_duplicate_heavy": 1,  # t2:b2
    "dropped_non_target": 0,
    "system_prompts_removed": 0,  # OASST has none
    "non_target_language_messages": 2,  # a4 (declared), e3 (detected)
    "cut_non_target_messages": 0,
    "output_conversations": 5,
}


def test_oasst_paths_counts_and_shared_prefixes() -> None:
    kept, report = refine_file(FIXTURES / "oasst.jsonl", "oasst")
    assert report == OASST_REPORT
    assert [(c.id, len(c.messages)) for c in kept] == [
        ("t1:a5", 6),
        ("t1:a6", 6),
        ("t1:a3", 2),
        ("t1:a4", 2),
        ("t5:e4", 4),
    ]
    assert kept[0].messages[:4] == kept[1].messages[:4]
    assert not any("rimosso" in m.text for c in kept for m in c.messages)


def test_oasst_cutting_non_target_messages() -> None:
    kept, report = refine_file(FIXTURES / "oasst.jsonl", "oasst", cut_non_target=True)
    assert report == {
        **OASST_REPORT,
        "dropped_non_target": 1,  # t1:a4
        "cut_non_target_messages": 4,  # t1:a4's p1 a4, t5:e4's e3 e4
        "output_conversations": 4,
    }
    assert [(c.id, len(c.messages)) for c in kept] == [
        ("t1:a5", 6),
        ("t1:a6", 6),
        ("t1:a3", 2),
        ("t5:e4", 2),
    ]


# -- jsonl -----------------------------------------------------------------------------

# chats.jsonl, 10 lines, Italian:
#   #0 id c1, "system" field                                 -> kept, 1 system prompt
#   #1 no id, 2 system messages (one mid-way), role aliases  -> kept, 2 system prompts
#   #2 blank texts (its system field goes with it)           -> dropped_empty
#   #3 id "vuota", no messages                               -> dropped_empty
#   #4 a "tool" turn                                         -> dropped_bad_alternation
#   #5 one unanswered user turn                              -> dropped_bad_alternation
#   #6 id c1-copia, c1 again: 2/2                            -> dropped_duplicate_heavy
#   #7 id c8, c1's question again: 1/2, "system": null        -> kept
#   #8 English answer to the 1st question                    -> kept, 1 non-target
#      (with cut_non_target: cut to nothing, 2 messages cut -> dropped_non_target)
#   #9 id 42, "system": "" (no prompt), English 2nd question  -> kept, 1 non-target
#      (with cut_non_target: cut to the 1st exchange, 2 messages cut)
JSONL_REPORT = {
    "input_conversations": 10,
    "tags_fixed": 0,
    "dropped_empty": 2,  # #2, #3
    "dropped_bad_alternation": 2,  # #4, #5
    "dropped_duplicate_heavy": 1,  # #6
    "dropped_non_target": 0,
    "system_prompts_removed": 3,  # #0: 1, #1: 2
    "non_target_language_messages": 2,  # #8's answer, #9's 2nd question
    "cut_non_target_messages": 0,
    "output_conversations": 5,
}
JSONL_CUT_REPORT = {
    **JSONL_REPORT,
    "dropped_non_target": 1,  # #8
    "cut_non_target_messages": 4,  # #8's exchange, #9's 2nd exchange
    "output_conversations": 4,
}
PHOTO_Q = ("user", "Mi spieghi cos'è la fotosintesi?")
JSONL_CUT_KEPT = [
    (
        "c1",
        [
            PHOTO_Q,
            (
                "assistant",
                "È il processo con cui le piante usano la luce del sole per trasformare acqua "
                "e anidride carbonica in zuccheri.",
            ),
        ],
    ),
    (
        "chats.jsonl#1",
        [
            ("user", "Qual è il fiume più lungo che scorre in Italia?"),
            ("assistant", "Il fiume più lungo è il Po, che scorre per circa 652 chilometri."),
            ("user", "E qual è il lago più grande del paese?"),
            (
                "assistant",
                "Il più esteso è il lago di Garda, che si trova tra la Lombardia e il Veneto.",
            ),
        ],
    ),
    (
        "c8",
        [
            PHOTO_Q,
            (
                "assistant",
                "Le piante catturano la luce con la clorofilla e liberano ossigeno come "
                "prodotto di scarto.",
            ),
        ],
    ),
    (
        "42",
        [
            ("user", "Quali sono i colori della bandiera italiana?"),
            ("assistant", "Verde, bianco e rosso, disposti in tre bande verticali."),
        ],
    ),
]


GATTO = [
    ("user", "Come si dice la parola gatto in inglese e anche in francese?"),
    (
        "assistant",
        "In English it is cat, and in French it is chat, pronounced without the final letter.",
    ),
]
FLAG_MEANING = [
    ("user", "And what do the colours of the flag mean?"),
    (
        "assistant",
        "Secondo una lettura diffusa il verde indica la speranza, il bianco la fede e il rosso "
        "la carità.",
    ),
]
JSONL_KEPT = [
    *JSONL_CUT_KEPT[:3],
    ("chats.jsonl#8", GATTO),
    ("42", JSONL_CUT_KEPT[3][1] + FLAG_MEANING),
]


def test_jsonl_counts_and_survivors() -> None:
    kept, report = refine_file(FIXTURES / "chats.jsonl", "jsonl")
    assert report == JSONL_REPORT
    assert pairs(kept) == JSONL_KEPT
    assert {c.source for c in kept} == {"jsonl"}
    kept, report = refine_file(FIXTURES / "chats.jsonl", "jsonl", cut_non_target=True)
    assert report == JSONL_CUT_REPORT
    assert pairs(kept) == JSONL_CUT_KEPT


@pytest.mark.parametrize(
    ("name", "fmt", "language"),
    [
        ("fauno.json", "fauno", "it"),
        ("baize.jsonl", "baize", "en"),
        ("oasst.jsonl", "oasst", "it"),
        ("chats.jsonl", "jsonl", "it"),
    ],
)
def test_every_conversation_is_kept_or_dropped_once(name: str, fmt: str, language: str) -> None:
    kept, report = refine_file(FIXTURES / name, fmt, language=language)
    cut, cut_report = refine_file(FIXTURES / name, fmt, language=language, cut_non_target=True)
    for convs, rep in ((kept, report), (cut, cut_report)):
        assert list(rep) == KEYS
        assert rep["output_conversations"] == len(convs)
        dropped = sum(rep[k] for k in DROPS)
        assert rep["input_conversations"] == rep["output_conversations"] + dropped
    # Keeping cuts nothing; cutting removes exactly the messages it counts.
    assert report["dropped_non_target"] == report["cut_non_target_messages"] == 0
    assert sum(map(len, (c.messages for c in kept))) == (
        sum(map(len, (c.messages for c in cut))) + cut_report["cut_non_target_messages"]
    )
    assert cut_report["non_target_language_messages"] == report["non_target_language_messages"]


# -- step 1: tags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "fixed"),
    [
        ("[|Umano|] a [|AI|] b", "[|Umano|] a [|AI|] b", 0),
        ("[| Umano |] a", "[|Umano|] a", 1),
        ("[ |AI|] a", "[|AI|] a", 1),
        ("[|AI |] a", "[|AI|] a", 1),
        ("[|umano|] a [|ai|]", "[|Umano|] a [|AI|]", 2),
        ("[| Human|] a", "[|Umano|] a", 1),
        ("[|AI] a |AI|] b [|AI| c [AI|] d", "[|AI|] a [|AI|] b [|AI|] c [|AI|] d", 4),
        ("[ | AI\t| ]", "[|AI|]", 1),
        # Not tags: two delimiters, another word, a longer word, a line break inside.
        ("[AI] | AI | [Umano]", "[AI] | AI | [Umano]", 0),
        ("[|Assistente|] [|AIuto|] L'AI", "[|Assistente|] [|AIuto|] L'AI", 0),
        ("[|\nAI|]", "[|\nAI|]", 0),
    ],
)
def test_fix_tags(text: str, expected: str, fixed: int) -> None:
    assert fix_tags(text, "fauno") == (expected, fixed)


def test_split_transcript_system_line_and_end_marker() -> None:
    system, turns = split_transcript(
        "  Sistema.  \n[|Umano|] Ciao\n\n[|AI|]  Salve,\ncome va?\n[|Umano|]  \n", "fauno"
    )
    assert system == ("Sistema.",)
    assert turns == [Turn("user", "Ciao"), Turn("assistant", "Salve,\ncome va?")]
    # Only the last empty turn is the end marker; no text before the first tag: no system.
    assert split_transcript("[|Umano|] a\n[|AI|]\n[|Umano|]", "fauno") == (
        (),
        [Turn("user", "a"), Turn("assistant", "")],
    )


# -- step 4: duplicates ------------------------------------------------------------------

A = [
    "Quali libri di Umberto Eco mi consigli di leggere per primi?",
    "Comincia da Il nome della rosa, poi prova Il pendolo di Foucault.",
    "Sono romanzi difficili da leggere per un principiante?",
    "Il primo si legge bene, il secondo richiede un po' più di pazienza.",
]
NEW = [f"Messaggio nuovo numero {n}, scritto soltanto per questa prova." for n in range(8)]


def test_duplicate_threshold_half_survives_more_drops(tmp_path: Path) -> None:
    f = chats(
        tmp_path / "dup.jsonl",
        [
            A,
            [A[0], NEW[0], A[2], NEW[1]],  # c1: 2/4 = 50%: kept
            [A[0], A[1], A[2], NEW[2]],  # c2: 3/4 = 75%: dropped
            [NEW[3], NEW[4], NEW[3], NEW[4]],  # c3: repeats itself, 2/4: kept
            [NEW[5], NEW[6], NEW[5], NEW[6], NEW[5], NEW[6]],  # c4: 4/6: dropped
            # c5: whitespace and case: "  a\n b " equals "a b", but case matters: 1/2: kept
            [" " + A[0].replace(" ", "\n  ", 2), A[1].upper()],
        ],
    )
    kept, report = refine_file(f, "jsonl")
    assert [c.id for c in kept] == ["c0", "c1", "c3", "c5"]
    assert report["dropped_duplicate_heavy"] == 2
    assert report["non_target_language_messages"] == 0


def test_dropped_conversations_are_never_seen(tmp_path: Path) -> None:
    f = chats(
        tmp_path / "seen.jsonl",
        [
            [NEW[0]],  # c0: unanswered (bad alternation): its message is not seen
            [NEW[0], NEW[1]],  # c1: the first copy that counts: kept
            A,  # c2: kept
            [*A, NEW[2], NEW[3]],  # c3: 4/6 of c2: dropped, so NEW[2] and NEW[3] stay unseen
            [NEW[2], NEW[3]],  # c4: 0/2: kept (it would be 2/2 if c3's messages counted)
        ],
    )
    kept, report = refine_file(f, "jsonl")
    assert [c.id for c in kept] == ["c1", "c2", "c4"]
    assert report["dropped_bad_alternation"] == 1
    assert report["dropped_duplicate_heavy"] == 1


# -- step 5: language ------------------------------------------------------------------


def test_min_chars_decides_what_is_judged(tmp_path: Path) -> None:
    thanks = "Thank you, that is perfect."  # 27 characters, English
    f = chats(tmp_path / "short.jsonl", [[A[0], A[1], thanks, A[3]]])
    kept, report = refine_file(f, "jsonl", min_chars=20, cut_non_target=True)
    assert report["non_target_language_messages"] == 1
    assert [len(c.messages) for c in kept] == [2]
    kept, report = refine_file(f, "jsonl", min_chars=28, cut_non_target=True)
    assert report["non_target_language_messages"] == 0
    assert [len(c.messages) for c in kept] == [4]


def test_declared_language_decides_whatever_the_length() -> None:
    judge = LanguageJudge("it", min_chars=20)
    assert not judge.in_target(Turn("user", "Ok", lang="en-GB"))
    assert judge.in_target(Turn("user", "This text is plainly written in English.", lang="IT"))
    assert judge.in_target(Turn("user", "Ok"))  # no declaration, too short to judge


# Step 5 on code and names: the paper's English hits were mostly code and Italian
# sentences holding English names, so neither may count as another language.
CODE_FENCED = (
    "Ecco come leggere le impostazioni da un file:\n\n"
    "```python\n"
    "import json\n\n"
    "def load_settings(path):\n"
    '    """Read the settings file and return them as a dictionary."""\n'
    '    with open(path, encoding="utf-8") as handle:\n'
    "        return json.load(handle)  # raises an error when the file is missing\n"
    "```\n\n"
    "La funzione restituisce un dizionario con tutte le impostazioni."
)
CODE_INDENTED = (
    "Puoi scrivere così:\n\n"
    '    with open("notes.txt", encoding="utf-8") as handle:\n'
    "        # count the lines that are not empty\n"
    "        total = sum(1 for line in handle if line.strip())\n"
    '    print("number of non-empty lines in the file:", total)\n\n'
    "Il risultato è il numero di righe non vuote."
)
ONLY_CODE = (
    "```bash\n"
    "git checkout main\n"
    "git pull --rebase origin main\n"
    "git push --force-with-lease origin feature/update-the-readme\n"
    "```"
)
NAMES_Q = (
    "Ieri sera ho rivisto The Lord of the Rings di Peter Jackson e poi ho ascoltato "
    "tutto The Dark Side of the Moon dei Pink Floyd: cosa mi consigli per stasera?"
)
NAMES_A = (
    "Potresti guardare Star Wars o Blade Runner, e ascoltare Wish You Were Here, "
    "che è un altro album bellissimo dei Pink Floyd."
)
ENGLISH_Q = "Could you explain that again in simpler words, please?"
ENGLISH_FIRST = "Which Italian city would you recommend for a weekend in spring?"
IT_ANSWER = "Firenze in primavera è bellissima, con i giardini in fiore e pochi turisti."


def test_code_and_english_names_are_not_judged_as_another_language() -> None:
    whole = LanguageCheck("it", min_chars=20)  # the detector on the raw text
    judge = LanguageJudge("it", min_chars=20)  # step 5: the text without its code
    for text in (CODE_FENCED, CODE_INDENTED, ONLY_CODE):
        assert not whole.ok(text)  # judged with its code, it would count as foreign
        assert judge.in_target(Turn("assistant", text))
    assert strip_code(ONLY_CODE) == ""  # only code: nothing left to judge, so it passes
    for text in (NAMES_Q, NAMES_A):
        assert whole.ok(text) and judge.in_target(Turn("user", text))
    assert not judge.in_target(Turn("user", ENGLISH_Q))


def test_non_target_messages_are_kept_and_counted_or_cut_on_request(tmp_path: Path) -> None:
    f = chats(
        tmp_path / "step5.jsonl",
        [
            ["Come si leggono le impostazioni da un file JSON?", CODE_FENCED],  # c0: in target
            ["Quali comandi servono per aggiornare il ramo principale?", ONLY_CODE],  # c1
            ["Come conto le righe non vuote di un file?", CODE_INDENTED],  # c2: in target
            [NAMES_Q, NAMES_A],  # c3: Italian with English names: in target
            [A[0], A[1], ENGLISH_Q, A[3]],  # c4: English 2nd question
            [ENGLISH_FIRST, IT_ANSWER],  # c5: English 1st question
        ],
    )
    texts = [
        m["text"]
        for line in f.read_text("utf-8").splitlines()
        for m in json.loads(line)["messages"]
    ]
    kept, report = refine_file(f, "jsonl")
    assert report["non_target_language_messages"] == 2  # ENGLISH_Q, ENGLISH_FIRST
    assert report["dropped_non_target"] == report["cut_non_target_messages"] == 0
    assert [c.id for c in kept] == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert [m.text for c in kept for m in c.messages] == texts  # nothing cut, code included

    kept, report = refine_file(f, "jsonl", cut_non_target=True)
    assert report["non_target_language_messages"] == 2
    assert report["cut_non_target_messages"] == 4  # c4's 2nd exchange, c5's only one
    assert report["dropped_non_target"] == 1  # c5, not counted as dropped_empty
    assert report["dropped_empty"] == 0
    assert report["input_conversations"] == report["output_conversations"] + 1
    assert [(c.id, len(c.messages)) for c in kept] == [
        ("c0", 2),
        ("c1", 2),
        ("c2", 2),
        ("c3", 2),
        ("c4", 2),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Testo\n```py\nx = 1\n```\nfine", "Testo\nfine"),
        ("a\n~~~\nx\n~~~\nb", "a\nb"),
        ("a\n  ```\nx\n```\nb", "a\nb"),  # an indented fence (inside a list item)
        ("a\n````\n```\nx\n````\nb", "a\nb"),  # closed by a run at least as long
        ("a\n```\nx\ny", "a"),  # never closed: code to the end
        ("Prosa:\n\n    code()\n\n    more()\ndopo", "Prosa:\n\n\ndopo"),
        ("    code()\ntesto", "testo"),  # indented at the start of the text
        ("1. primo punto\n    che continua qui", "1. primo punto\n    che continua qui"),
        ("usa `git status` e ``a`b`` ora", "usa   e   ora"),
        ("```x()``` e poi", "  e poi"),  # one line: an inline span, not a fence
        ("nessun codice qui", "nessun codice qui"),
    ],
)
def test_strip_code(text: str, expected: str) -> None:
    assert strip_code(text) == expected


# -- streaming and arguments -----------------------------------------------------------


def test_refiner_streams_up_to_a_broken_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "text": A[0]}, {"role": "assistant", "text": A[1]}]}
    f = write(tmp_path / "s.jsonl", json.dumps(good) + "\n{broken\n")
    refiner = Refiner()
    stream = refiner.run(read_conversations(f, "jsonl"))
    assert next(stream).id == "s.jsonl#0"
    with pytest.raises(IngestError, match=f"{f}:2: invalid JSON"):
        next(stream)
    assert refiner.report.output_conversations == 1


@pytest.mark.parametrize("content", ["", "\n \n", "[]", " [\n ]\n"])
def test_a_file_without_records_gives_an_empty_report(tmp_path: Path, content: str) -> None:
    kept, report = refine_file(write(tmp_path / "e.json", content), "fauno")
    assert kept == []
    assert report == dict.fromkeys(KEYS, 0)


def test_raw_conversations_carry_their_position() -> None:
    raws = list(read_conversations(FIXTURES / "fauno.json", "fauno"))
    assert [(r.index, r.line) for r in raws[:3]] == [(0, 2), (1, 6), (2, 10)]
    assert raws[1].where == f"{FIXTURES / 'fauno.json'}:6"
    assert isinstance(raws[0], RawConversation)
    assert raws[0].transcript is not None
    assert raws[0].transcript.startswith("The conversation between human and AI assistant.\n")


def test_bad_arguments() -> None:
    with pytest.raises(UsageError, match="unknown ingest format 'sharegpt'"):
        refine_file(FIXTURES / "chats.jsonl", "sharegpt")
    with pytest.raises(UsageError, match="min_chars"):
        refine_file(FIXTURES / "chats.jsonl", "jsonl", min_chars=0)
    with pytest.raises(ConfigError, match="unknown ISO 639-1"):
        refine_file(FIXTURES / "chats.jsonl", "jsonl", language="xx")


def test_cli_keeps_by_default_and_cuts_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ingest", str(FIXTURES / "chats.jsonl"), "--format", "jsonl", "--dry-run", "--json"]
    argv += ["--state-dir", str(tmp_path)]
    for flags, expected in (
        ([], JSONL_REPORT),
        (["--keep-non-target"], JSONL_REPORT),
        (["--cut-non-target"], JSONL_CUT_REPORT),
    ):
        assert main([*argv, *flags]) == 0
        assert json.loads(capsys.readouterr().out) == expected
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--cut-non-target", "--keep-non-target"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# -- bad input ---------------------------------------------------------------------

OK_T = {"input": "[|Umano|] a\n[|AI|] b\n[|Umano|]"}
OK_M = {"messages": [{"role": "user", "text": "a"}, {"role": "assistant", "text": "b"}]}


def jl(*records: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def tree(**prompt: Any) -> dict[str, Any]:
    return {"prompt": {"message_id": "p", "role": "prompter", "text": "x", **prompt}}


@pytest.mark.parametrize(
    ("content", "fmt", "line", "fragment"),
    [
        # JSONL
        (jl(OK_T, "", '{"input": '), "fauno", 3, "invalid JSON"),
        (jl(OK_T, "[1]"), "baize", 2, "expected a JSON object, got list"),
        (jl(OK_T, {"text": "a"}), "fauno", 2, "transcript as a string in 'input' (keys: text)"),
        (jl({"input": None}), "baize", 1, "in 'input'"),
        (jl(OK_T, {"id": "x", **OK_T}, {"id": "x", **OK_T}), "fauno", 3, "duplicate"),
        (jl({"id": True, **OK_T}), "fauno", 1, "'id' must be"),
        # A JSON list: each item's own line
        ('[\n  {"input": "a"},\n  "ciao"\n]', "fauno", 3, "expected a JSON object, got str"),
        ('[\n  {"input": "a"},\n  {"input": "b",}\n]', "fauno", 3, "invalid JSON"),
        ('\n[\n  {"input": "a"}\n  {"input": "b"}\n]', "fauno", 4, "expected ',' or ']'"),
        ('[{"input": "a"}]\n\n{"input": "b"}\n', "fauno", 3, "extra data after the list"),
        ('[\n  {"input": "a"},\n  {"topic": "b"}\n]', "baize", 3, "in 'input'"),
        # jsonl
        (jl(OK_M, {"messages": "ciao"}), "jsonl", 2, "expected a 'messages' list"),
        (jl(OK_M, {"system": 1, **OK_M}), "jsonl", 2, "'system' must be a string"),
        (jl({"messages": ["ciao"]}), "jsonl", 1, "message 0 is not a JSON object"),
        (jl({"messages": [{"text": "a"}]}), "jsonl", 1, "message 0 has no 'role'"),
        (jl({"messages": [{"role": "user", "text": None}]}), "jsonl", 1, "no 'text' or"),
        # OASST
        (jl({"message_id": "m", "parent_id": None}), "oasst", 1, "flat message exports"),
        (jl(tree(), tree(replies="no")), "oasst", 2, "'replies' must be a list"),
        (jl(tree(message_id="")), "oasst", 1, "without a 'message_id'"),
        (jl(tree(replies=[{"message_id": "a", "role": "assistant"}])), "oasst", 1, "'text'"),
        (jl(tree(role=None)), "oasst", 1, "no 'role'"),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, content: str, fmt: str, line: int, fragment: str
) -> None:
    f = write(tmp_path / "bad.json", content)
    with pytest.raises(IngestError) as err:
        refine_file(f, fmt)
    assert f"{f}:{line}: " in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (jl(OK_T).encode() + '{"input": "perché"}\n'.encode("latin-1"), 2),
        (b'[\n  {"input": "a"},\n  {"input": "perch\xe8"}\n]\n', 3),
    ],
)
def test_text_that_is_not_utf8(tmp_path: Path, content: bytes, line: int) -> None:
    f = write(tmp_path / "latin1.json", content)
    with pytest.raises(IngestError, match="not UTF-8") as err:
        refine_file(f, "fauno")
    assert f"{f}:{line}: " in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="cannot read the file") as err:
        refine_file(tmp_path / "nope.jsonl", "jsonl")
    assert str(tmp_path / "nope.jsonl") in str(err.value)
