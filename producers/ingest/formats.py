"""Readers of the corpora that ``corpusfactory ingest`` refines (method.md §4).

Every reader yields ``RawConversation``s in file order, each with its position
(file, line where its record starts, 0-based record index), and holds no more
than one record at a time.

Files
-----
Every format is read from either a JSON list of objects or JSONL (one object per
line), told apart by the first non-blank character of the file (``[``: a JSON
list). JSONL is streamed line by line; a JSON list is read whole (the standard
library has no streaming JSON parser) and its items are decoded one at a time.

Formats
-------
``fauno`` / ``baize``
    ``{"input": TRANSCRIPT, "id"?: str|int, "topic"?: any}``. The transcript is kept
    verbatim: repairing its turn tags and splitting it into turns is the first
    refinement step (``refine.py``). ``topic`` is ignored.
``oasst``
    The OpenAssistant tree export: ``{"message_tree_id"?, "prompt": NODE}`` with NODE
    ``{"message_id", "role": "prompter"|"assistant", "text", "lang"?, "deleted"?,
    "replies"?: [NODE]}``. Every root-to-leaf path is one conversation with id
    ``TREE:LEAF`` (the path logic is ``corpusfactory.seeds``'); a deleted message
    and everything below it belong to no path. Flat message exports are not read.
``jsonl``
    ``{"id"?: str|int, "system"?: str|null, "messages": [{"role": str,
    "text"|"content": str}]}``. Roles are those of ``seeds.ROLE_ALIASES`` (user, human,
    prompter / assistant, gpt, bot, ai) plus ``system``, accepted at any position and
    set apart as a system prompt. Any other role name is kept as an unknown role,
    which the alternation rule then drops.

A conversation without an ``id`` gets ``FILE_NAME#INDEX`` (its record index).
Turn texts are stripped; inner whitespace (code, lists) is kept.

Errors
------
Input that is not the format it was given as raises ``IngestError`` naming the
file and line: an unreadable file, text that is not UTF-8, invalid JSON, a record
of the wrong shape (a missing ``input``, a text that is not a string, ...), a
repeated ``id``. Such a record is not counted as dropped: the report's drop keys
are the refinement's rules, and a record of the wrong shape means the file or
the ``--format`` is wrong, which a count would hide. Problems of content (empty
texts, unknown roles, broken tags) are the refinement's to repair or count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from corpusfactory.errors import CorpusFactoryError, SeedError, UsageError
from corpusfactory.seeds import ROLE_ALIASES, SYSTEM_ROLE, _msg_id, _paths, _replies

FORMATS = ("fauno", "baize", "oasst", "jsonl")

Json = dict[str, Any]
_WS = re.compile(r"[ \t\n\r]*")


class IngestError(CorpusFactoryError):
    """An input file cannot be read as the format it was given as."""


@dataclass(frozen=True)
class Turn:
    role: str | None  # "user" | "assistant"; None: a role name no format knows
    text: str  # stripped
    lang: str | None = None  # the language the source declares (OASST "lang")
    uid: str | None = None  # the message's identity when paths share it (OASST "TREE:ID")


@dataclass(frozen=True)
class RawConversation:
    """One conversation as read, before any refinement."""

    id: str
    source: str  # the format name
    path: Path
    line: int  # where its record starts
    index: int  # 0-based record index in the file
    transcript: str | None = None  # fauno / baize: the text, tags not yet repaired
    turns: tuple[Turn, ...] = ()  # oasst / jsonl
    system: tuple[str, ...] = ()  # jsonl: the system prompts present

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_conversations(path: str | Path, fmt: str) -> Iterator[RawConversation]:
    """The conversations of a file, in file order; see the module docstring."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown ingest format {fmt!r} (expected one of {', '.join(FORMATS)})")
    src = Path(path)
    if fmt == "oasst":
        return _oasst(src)
    if fmt == "jsonl":
        return _jsonl(src)
    return _transcripts(src, fmt)


# -- records: JSON list or JSONL -------------------------------------------------


def read_records(src: Path) -> Iterator[tuple[int, int, Json]]:
    """(line, record index, object) for every record of a JSON list or JSONL file."""
    try:
        fh = src.open("rb")
    except OSError as e:
        raise IngestError(f"{src}: cannot read the file: {e.strerror or e}") from e
    with fh:
        index = 0
        # Iterating bytes splits on b"\n" only, never inside a JSON string (str lines
        # would also split on U+2028, which JSON allows unescaped).
        for lineno, raw in enumerate(fh, 1):
            text = _decode(src, lineno, raw)
            if not text.strip():
                continue
            if index == 0 and text.lstrip().startswith("["):
                rest = fh.read()
                yield from _json_list(src, lineno, _decode(src, lineno, raw + rest))
                return
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise IngestError(
                    f"{src}:{lineno}: invalid JSON: {e.msg} (column {e.colno})"
                ) from e
            yield lineno, index, _object(src, lineno, obj)
            index += 1


def _decode(src: Path, lineno: int, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = lineno + data.count(b"\n", 0, e.start)
        raise IngestError(f"{src}:{line}: not UTF-8 text ({e.reason})") from e


def _object(src: Path, lineno: int, obj: Any) -> Json:
    if not isinstance(obj, dict):
        raise IngestError(f"{src}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_list(src: Path, first_line: int, text: str) -> Iterator[tuple[int, int, Json]]:
    """The items of a JSON list starting at ``first_line``, each with its own line."""
    decoder = json.JSONDecoder()
    line, mark = first_line, 0

    def line_at(pos: int) -> int:  # positions only grow: count each newline once
        nonlocal line, mark
        line += text.count("\n", mark, pos)
        mark = pos
        return line

    pos = _skip_ws(text, text.index("[") + 1)
    index = 0
    while not text.startswith("]", pos):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise IngestError(f"{src}:{line_at(e.pos)}: invalid JSON: {e.msg}") from e
        at = line_at(pos)
        yield at, index, _object(src, at, obj)
        index += 1
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif not text.startswith("]", pos):
            raise IngestError(
                f"{src}:{line_at(pos)}: invalid JSON: expected ',' or ']' after item {index - 1}"
            )
    pos = _skip_ws(text, pos + 1)
    if pos != len(text):
        raise IngestError(f"{src}:{line_at(pos)}: invalid JSON: extra data after the list")


def _skip_ws(text: str, pos: int) -> int:
    """The position of the first non-whitespace character at or after ``pos``."""
    match = _WS.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


class _Ids:
    """Conversation ids: the given one, each allowed once, or FILE_NAME#INDEX."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.first_line: dict[str, int] = {}

    def take(self, lineno: int, index: int, obj: Json) -> str:
        given = obj.get("id")
        if given is None or given == "":
            return f"{self.src.name}#{index}"
        if isinstance(given, bool) or not isinstance(given, str | int):
            raise IngestError(f"{self.src}:{lineno}: 'id' must be a string or an integer")
        conv_id = str(given)
        if conv_id in self.first_line:
            raise IngestError(
                f"{self.src}:{lineno}: duplicate conversation id {conv_id!r} "
                f"(first at line {self.first_line[conv_id]})"
            )
        self.first_line[conv_id] = lineno
        return conv_id


# -- the formats -------------------------------------------------------------------


def _transcripts(src: Path, fmt: str) -> Iterator[RawConversation]:
    ids = _Ids(src)
    for lineno, index, obj in read_records(src):
        transcript = obj.get("input")
        if not isinstance(transcript, str):
            raise IngestError(
                f"{src}:{lineno}: expected a {fmt} record with the transcript as a string "
                f"in 'input' (keys: {', '.join(sorted(obj)) or 'none'})"
            )
        conv_id = ids.take(lineno, index, obj)
        yield RawConversation(conv_id, fmt, src, lineno, index, transcript=transcript)


def _jsonl(src: Path) -> Iterator[RawConversation]:
    ids = _Ids(src)
    for lineno, index, obj in read_records(src):
        items = obj.get("messages")
        if not isinstance(items, list):
            raise IngestError(f"{src}:{lineno}: expected a 'messages' list")
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise IngestError(f"{src}:{lineno}: 'system' must be a string")
        prompts = [system.strip()] if system and system.strip() else []
        turns: list[Turn] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise IngestError(f"{src}:{lineno}: message {i} is not a JSON object")
            role = item.get("role")
            text = next((item[k] for k in ("text", "content") if k in item), None)
            if not isinstance(role, str):
                raise IngestError(f"{src}:{lineno}: message {i} has no 'role' string")
            if not isinstance(text, str):
                raise IngestError(f"{src}:{lineno}: message {i} has no 'text' or 'content' string")
            name = role.strip().lower()
            if name != SYSTEM_ROLE:
                turns.append(Turn(ROLE_ALIASES.get(name), text.strip()))
            elif text.strip():  # an empty system message is no prompt
                prompts.append(text.strip())
        conv_id = ids.take(lineno, index, obj)
        yield RawConversation(
            conv_id, "jsonl", src, lineno, index, turns=tuple(turns), system=tuple(prompts)
        )


def _not_deleted(node: Json) -> bool:
    return not node.get("deleted")


def _oasst(src: Path) -> Iterator[RawConversation]:
    for lineno, index, obj in read_records(src):
        root = obj.get("prompt")
        if not isinstance(root, dict):
            hint = " (flat message exports are not read: use the tree export)"
            raise IngestError(
                f"{src}:{lineno}: expected an OASST tree with a 'prompt' object"
                + (hint if "message_id" in obj else "")
            )
        try:  # the path logic of seeds.py raises SeedError, already naming file and line
            tree = str(obj.get("message_tree_id") or _msg_id(src, lineno, root))
            paths = [
                (
                    f"{tree}:{_msg_id(src, lineno, path[-1])}",
                    tuple(_oasst_turn(src, lineno, tree, node) for node in path),
                )
                for path in _paths(root, partial(_replies, src, lineno), _not_deleted)
            ]
        except SeedError as e:
            raise IngestError(str(e)) from e
        # A tree is small; its paths are built first so that a malformed message
        # anywhere in it fails before any of them is yielded.
        for conv_id, turns in paths:
            yield RawConversation(conv_id, "oasst", src, lineno, index, turns=turns)


def _oasst_turn(src: Path, lineno: int, tree: str, node: Json) -> Turn:
    mid = _msg_id(src, lineno, node)
    role, text, lang = node.get("role"), node.get("text"), node.get("lang")
    if not isinstance(role, str):
        raise IngestError(f"{src}:{lineno}: message {mid!r} has no 'role' string")
    if not isinstance(text, str):
        raise IngestError(f"{src}:{lineno}: message {mid!r} has no 'text' string")
    declared = lang.strip() if isinstance(lang, str) and lang.strip() else None
    return Turn(ROLE_ALIASES.get(role.strip().lower()), text.strip(), declared, f"{tree}:{mid}")
