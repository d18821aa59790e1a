"""Seed loading: the built-in set, JSONL and OASST formats, and errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.chatformat import Message
from corpusfactory.errors import SeedError
from corpusfactory.seeds import (
    SeedConversation,
    builtin_seed_path,
    load_seeds,
    read_seeds,
    seed_messages,
)


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Write one line per item: dicts as JSON, strings verbatim (for blank or broken lines)."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def as_pairs(convs: list[SeedConversation]) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(c.id, [(m.role, m.text) for m in c.messages]) for c in convs]


# -- the built-in set -----------------------------------------------------------


def test_builtin_set_loads_and_is_well_formed() -> None:
    convs = load_seeds()
    assert builtin_seed_path().is_file()
    assert builtin_seed_path().parent.name == "data"
    assert len(convs) >= 60
    assert len({c.id for c in convs}) == len(convs)
    for conv in convs:
        assert 4 <= len(conv.messages) <= 8, conv.id
        roles = [m.role for m in conv.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2), conv.id
        assert all(m.text and m.text == m.text.strip() for m in conv.messages), conv.id
        assert conv.source == str(builtin_seed_path())


def test_builtin_set_has_no_repeated_message() -> None:
    convs = load_seeds()
    total = sum(len(c.messages) for c in convs)
    assert len(seed_messages(convs)) == total


def test_explicit_path_and_fmt_read_the_same_builtin_set(tmp_path: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(builtin_seed_path().read_bytes())
    assert as_pairs(load_seeds(copy, "jsonl")) == as_pairs(load_seeds(None))


# -- OASST ----------------------------------------------------------------------


def node(mid: str, role: str, text: str, lang: str = "it", **extra: Any) -> dict[str, Any]:
    return {"message_id": mid, "role": role, "text": text, "lang": lang, **extra}


# Tree t1 branches twice under the prompt; one reply is English, one is deleted.
TREE_T1 = {
    "message_tree_id": "t1",
    "prompt": node(
        "p1",
        "prompter",
        "Come si cuoce la pasta?",
        replies=[
            node(
                "a1",
                "assistant",
                "In abbondante acqua salata.",
                replies=[
                    node(
                        "p2",
                        "prompter",
                        "Quanto sale?",
                        replies=[node("a2", "assistant", "Dieci grammi per litro.")],
                    ),
                    node("p3", "prompter", "Serve l'olio?"),
                ],
            ),
            node("a3", "assistant", "Dipende dal formato."),
            node("a4", "assistant", "Boil it in salted water.", lang="en"),
            node(
                "a5",
                "assistant",
                "Messaggio cancellato.",
                deleted=True,
                replies=[node("p4", "prompter", "Sotto un messaggio cancellato.")],
            ),
        ],
    ),
}
# An English tree, a prompt without replies, and a tree whose reply is not an assistant.
TREE_T2 = {
    "message_tree_id": "t2",
    "prompt": node(
        "q1",
        "prompter",
        "How are you?",
        lang="en",
        replies=[node("b1", "assistant", "Fine.", lang="en")],
    ),
}
TREE_T3 = {"message_tree_id": "t3", "prompt": node("r1", "prompter", "Nessuno mi risponde?")}
TREE_T4 = {
    "message_tree_id": "t4",
    "prompt": node("s1", "prompter", "Ciao", replies=[node("s2", "prompter", "Ancora io")]),
}

EXPECTED_IT = [
    (
        "t1:a2",
        [
            ("user", "Come si cuoce la pasta?"),
            ("assistant", "In abbondante acqua salata."),
            ("user", "Quanto sale?"),
            ("assistant", "Dieci grammi per litro."),
        ],
    ),
    (
        "t1:p3",
        [
            ("user", "Come si cuoce la pasta?"),
            ("assistant", "In abbondante acqua salata."),
            ("user", "Serve l'olio?"),
        ],
    ),
    ("t1:a3", [("user", "Come si cuoce la pasta?"), ("assistant", "Dipende dal formato.")]),
]


def flatten(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The tree as flat OASST messages, in depth-first order."""
    out: list[dict[str, Any]] = []

    def walk(n: dict[str, Any], parent: str | None) -> None:
        msg = {k: v for k, v in n.items() if k != "replies"}
        out.append({**msg, "parent_id": parent, "message_tree_id": tree["message_tree_id"]})
        for r in n.get("replies", []):
            walk(r, n["message_id"])

    walk(tree["prompt"], None)
    return out


def test_oasst_tree_gives_every_root_to_leaf_path(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "trees.jsonl", [TREE_T1, TREE_T2, TREE_T3, TREE_T4])
    result = read_seeds(f, "oasst", lang="it")
    assert as_pairs(result.conversations) == EXPECTED_IT
    # t3 is a lone prompt; t4 has a prompter answering a prompter; t2 is cut to nothing.
    assert result.dropped == {"fewer than 2 messages": 1, "not alternating from user": 1}
    assert all(c.source == str(f) for c in result.conversations)


def test_oasst_auto_detects_trees(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "trees.jsonl", [TREE_T1])
    assert as_pairs(load_seeds(f)) == EXPECTED_IT


def test_oasst_without_lang_filter_keeps_other_languages_but_not_deleted(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "trees.jsonl", [TREE_T1, TREE_T2])
    got = as_pairs(load_seeds(f, "oasst", lang=None))
    assert got == [
        *EXPECTED_IT,
        ("t1:a4", [("user", "Come si cuoce la pasta?"), ("assistant", "Boil it in salted water.")]),
        ("t2:b1", [("user", "How are you?"), ("assistant", "Fine.")]),
    ]
    assert not any("cancellato" in m.text for c in load_seeds(f, "oasst", None) for m in c.messages)


def test_oasst_lang_filter_selects_english(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "trees.jsonl", [TREE_T1, TREE_T2])
    assert [c.id for c in load_seeds(f, "oasst", lang="en")] == ["t2:b1"]


def test_oasst_flat_messages_give_the_same_paths(tmp_path: Path) -> None:
    msgs = flatten(TREE_T1)
    # Replies before their parents: linking must not depend on file order.
    reordered = msgs[1:] + msgs[:1]
    f = write_lines(tmp_path / "flat.jsonl", reordered)
    assert as_pairs(load_seeds(f, "oasst")) == EXPECTED_IT
    assert as_pairs(load_seeds(f, "auto")) == EXPECTED_IT


def test_oasst_flat_without_tree_id_uses_the_root_id(tmp_path: Path) -> None:
    msgs = [{k: v for k, v in m.items() if k != "message_tree_id"} for m in flatten(TREE_T1)]
    f = write_lines(tmp_path / "flat.jsonl", msgs)
    assert [c.id for c in load_seeds(f)] == ["p1:a2", "p1:p3", "p1:a3"]


def test_oasst_flat_lang_filter(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "flat.jsonl", flatten(TREE_T1) + flatten(TREE_T2))
    assert [c.id for c in load_seeds(f, "oasst", "en")] == ["t2:b1"]
    assert [c.id for c in load_seeds(f, "oasst", None)] == [
        "t1:a2",
        "t1:p3",
        "t1:a3",
        "t1:a4",
        "t2:b1",
    ]


# -- JSONL ----------------------------------------------------------------------


def test_jsonl_messages_style(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "chats.jsonl",
        [
            {
                "id": "c1",
                "messages": [
                    {"role": "system", "content": "Sei un assistente."},
                    {"role": "user", "content": "Che ore sono a Tokyo?"},
                    {"role": "assistant", "content": "Otto ore   più\n\ndi Roma."},
                ],
            },
            "",
            {
                "messages": [
                    {"role": "Human", "text": "Ciao!"},
                    {"role": "bot", "text": "Ciao, dimmi."},
                    {"role": "prompter", "text": "Niente."},
                    {"role": "ai", "text": "Va bene."},
                ]
            },
        ],
    )
    assert as_pairs(load_seeds(f)) == [
        ("c1", [("user", "Che ore sono a Tokyo?"), ("assistant", "Otto ore più di Roma.")]),
        (
            "chats.jsonl:3",
            [
                ("user", "Ciao!"),
                ("assistant", "Ciao, dimmi."),
                ("user", "Niente."),
                ("assistant", "Va bene."),
            ],
        ),
    ]


def test_jsonl_sharegpt_style(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "sg.jsonl",
        [
            {
                "id": 7,
                "conversations": [
                    {"from": "system", "value": "Rispondi in italiano."},
                    {"from": "human", "value": "Capitale della Francia?"},
                    {"from": "gpt", "value": "Parigi."},
                ],
            }
        ],
    )
    convs = load_seeds(f, "jsonl")
    assert convs == [
        SeedConversation(
            "7",
            (Message("user", "Capitale della Francia?"), Message("assistant", "Parigi.")),
            str(f),
        )
    ]


def test_jsonl_drops_and_counts_unusable_conversations(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "text": "a"}, {"role": "assistant", "text": "b"}]}
    f = write_lines(
        tmp_path / "mixed.jsonl",
        [
            good,
            {"messages": [{"role": "assistant", "text": "a"}, {"role": "user", "text": "b"}]},
            {"messages": [{"role": "user", "text": "a"}, {"role": "user", "text": "b"}]},
            {"messages": [{"role": "user", "text": "solo"}]},
            {"messages": [{"role": "user", "text": "a"}, {"role": "tool", "text": "b"}]},
            {"messages": [{"role": "user", "text": "a"}, {"role": "assistant", "text": "  "}]},
            {"lang": "en", **good},
            {"lang": "it", **good},
        ],
    )
    result = read_seeds(f)
    assert [c.id for c in result.conversations] == ["mixed.jsonl:1", "mixed.jsonl:8"]
    assert result.dropped == {
        "not alternating from user": 2,
        "fewer than 2 messages": 1,
        "unknown role": 1,
        "empty message": 1,
        "other language": 1,
    }
    assert [c.id for c in load_seeds(f, lang=None)] == [
        "mixed.jsonl:1",
        "mixed.jsonl:7",
        "mixed.jsonl:8",
    ]


# -- seed_messages ----------------------------------------------------------------


def test_seed_messages_ids_and_exact_text_dedup() -> None:
    a = SeedConversation("a", (Message("user", "Ciao"), Message("assistant", "Salve")), "x")
    b = SeedConversation("b", (Message("user", "Ciao"), Message("assistant", "ciao")), "x")
    assert seed_messages([a, b]) == [("a#0", "Ciao"), ("a#1", "Salve"), ("b#1", "ciao")]
    assert seed_messages([]) == []


# -- bad input ------------------------------------------------------------------

OK = {"messages": [{"role": "user", "text": "a"}, {"role": "assistant", "text": "b"}]}


@pytest.mark.parametrize(
    ("lines", "fmt", "lineno", "fragment"),
    [
        ([OK, "", '{"messages": [}'], "auto", 3, "invalid JSON"),
        (['{"messages": '], "jsonl", 1, "invalid JSON"),
        (["", {"text": "ciao", "author": "x"}], "auto", 2, "unknown seed format"),
        ([OK, "[1, 2]"], "jsonl", 2, "expected a JSON object"),
        ([OK, {"foo": 1}], "jsonl", 2, "'messages' or 'conversations'"),
        ([OK, {"messages": "ciao"}], "jsonl", 2, "must be a list"),
        ([OK, {"messages": [{"role": "user"}]}], "jsonl", 2, "message 0 has no text"),
        ([OK, {"messages": ["ciao"]}], "jsonl", 2, "message 0 is not a JSON object"),
        ([OK, {"id": "d", **OK}, {"id": "d", **OK}], "jsonl", 3, "duplicate conversation id"),
        ([TREE_T1, OK], "oasst", 2, "expected an OASST tree"),
        ([{"prompt": node("p", "prompter", "x", replies="no")}], "oasst", 1, "'replies'"),
        ([{"prompt": {"role": "prompter", "text": "x"}}], "oasst", 1, "without a 'message_id'"),
        (
            [{"prompt": node("p", "prompter", "x", replies=[node("a", "assistant", None)])}],
            "oasst",
            1,
            "has no text",
        ),
        (
            [node("m1", "prompter", "x", parent_id=None), node("m2", "assistant", "y")],
            "oasst",
            2,
            "without 'parent_id'",
        ),
        (
            [
                node("m1", "prompter", "x", parent_id=None),
                node("m1", "assistant", "y", parent_id="m1"),
            ],
            "oasst",
            2,
            "duplicate message_id",
        ),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, lines: list[Any], fmt: str, lineno: int, fragment: str
) -> None:
    f = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SeedError) as err:
        load_seeds(f, fmt)
    assert f"{f}:{lineno}:" in str(err.value)
    assert fragment in str(err.value)


def test_non_utf8_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(OK).encode() + b"\n" + '{"messages": "perché"}'.encode("latin-1"))
    with pytest.raises(SeedError, match="not UTF-8") as err:
        load_seeds(f)
    assert f"{f}:2:" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(SeedError, match="empty") as err:
        load_seeds(f)
    assert str(f) in str(err.value)


def test_file_without_usable_conversation_is_an_error(tmp_path: Path) -> None:
    short = {"messages": [{"role": "user", "text": "solo"}]}
    backwards = {"messages": [{"role": "assistant", "text": "a"}, {"role": "user", "text": "b"}]}
    f = write_lines(tmp_path / "none.jsonl", [short, backwards])
    with pytest.raises(SeedError, match="no usable seed conversation") as err:
        load_seeds(f)
    assert str(f) in str(err.value)
    assert "1 fewer than 2 messages" in str(err.value)
    # OASST: everything filtered out by language.
    g = write_lines(tmp_path / "en.jsonl", [TREE_T2])
    with pytest.raises(SeedError, match="no usable seed conversation"):
        load_seeds(g, "oasst", lang="it")


def test_missing_file_and_unknown_fmt_are_seed_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SeedError, match="cannot read") as err:
        load_seeds(missing)
    assert str(missing) in str(err.value)
    f = write_lines(tmp_path / "ok.jsonl", [OK])
    with pytest.raises(SeedError, match="unknown seed format 'csv'"):
        load_seeds(f, "csv")
