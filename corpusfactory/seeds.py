"""Seed conversations: the human-written chats the factory starts from.

Seeds serve as few-shot examples for the producers, as the reference set of the
vector index (a candidate too close to a seed is a near-duplicate) and as the
NLL calibration set. The built-in set is ``data/seeds_it.jsonl``; any file in
one of these formats can replace it:

``jsonl``
    One conversation per line, either ``{"messages": [{"role", "text"|"content"}]}``
    or ShareGPT's ``{"conversations": [{"from", "value"}]}``; optional ``"id"``.
``oasst``
    OpenAssistant message trees, as exported trees (one per line, ``"prompt"``
    holding nested ``"replies"``) or as flat messages (one per line, linked by
    ``"parent_id"``). Every root-to-leaf path becomes one conversation.
``auto``
    Chosen from the keys of the first non-empty line.

Every usable conversation alternates user/assistant starting with the user and
has at least two messages; others are dropped and counted. Anything malformed
raises ``SeedError`` naming the file and line.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

from corpusfactory.chatformat import Message
from corpusfactory.errors import SeedError

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "oasst")

# Role names used by common chat datasets, mapped onto the two roles of ChatFormat.
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "ai": "assistant",
}
SYSTEM_ROLE = "system"

Json = dict[str, Any]


@dataclass(frozen=True)
class SeedConversation:
    id: str
    messages: tuple[Message, ...]
    source: str  # the file it was read from


@dataclass
class SeedLoad:
    """What a read produced: the usable conversations and why the others were dropped."""

    conversations: list[SeedConversation] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)


def builtin_seed_path() -> Path:
    """The Italian seed set shipped as package data."""
    return Path(__file__).resolve().parent / "data" / "seeds_it.jsonl"


def load_seeds(
    path: str | Path | None = None, fmt: str = "auto", lang: str | None = "it"
) -> list[SeedConversation]:
    """Read a seed file (None: the built-in set); see the module docstring for formats."""
    result = read_seeds(path, fmt, lang)
    if result.dropped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(result.dropped.items()))
        log.info("seeds: dropped %d conversation(s): %s", result.dropped.total(), reasons)
    return result.conversations


def read_seeds(
    path: str | Path | None = None, fmt: str = "auto", lang: str | None = "it"
) -> SeedLoad:
    """Like ``load_seeds`` but also reports the dropped conversations by reason."""
    src = builtin_seed_path() if path is None else Path(path)
    if fmt not in FORMATS:
        raise SeedError(
            f"{src}: unknown seed format {fmt!r} (expected one of {', '.join(FORMATS)})"
        )
    # Streamed line by line: a full OASST export is large and only a few trees may be kept.
    records = _json_lines(src)
    first = next(records, None)
    if first is None:
        raise SeedError(f"{src}: the seed file is empty")
    if fmt == "auto":
        fmt = _detect(src, *first)
    lines = chain([first], records)
    out = SeedLoad()
    seen: dict[str, int] = {}
    parse = _parse_jsonl if fmt == "jsonl" else _parse_oasst
    for lineno, conv_id, turns in parse(src, lines, lang, out.dropped):
        reason = _unusable(turns)
        if reason:
            out.dropped[reason] += 1
            continue
        if conv_id in seen:
            raise SeedError(
                f"{src}:{lineno}: duplicate conversation id {conv_id!r} "
                f"(first at line {seen[conv_id]})"
            )
        seen[conv_id] = lineno
        messages = tuple(
            Message(role, text) for role, text in turns if role is not None and role != SYSTEM_ROLE
        )
        out.conversations.append(SeedConversation(conv_id, messages, str(src)))
    if not out.conversations:
        why = ", ".join(f"{n} {r}" for r, n in sorted(out.dropped.items())) or "none found"
        raise SeedError(f"{src}: no usable seed conversation ({why})")
    return out


def seed_messages(convs: Iterable[SeedConversation]) -> list[tuple[str, str]]:
    """Every seed message as (``<conv_id>#<index>``, text), each distinct text once."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for conv in convs:
        for i, msg in enumerate(conv.messages):
            if msg.text not in seen:
                seen.add(msg.text)
                out.append((f"{conv.id}#{i}", msg.text))
    return out


# -- reading -------------------------------------------------------------------

# A parsed turn: (normalised role or None when unknown, text). Role "system" is kept
# until validation so that it can be skipped rather than counted as unknown.
Turn = tuple[str | None, str]
Parsed = Iterator[tuple[int, str, list[Turn]]]


def _json_lines(src: Path) -> Iterator[tuple[int, Json]]:
    """(line number, object) for every non-blank line."""
    try:
        data = src.read_bytes()
    except OSError as e:
        raise SeedError(f"{src}: cannot read the seed file: {e.strerror or e}") from e
    # bytes.splitlines splits only on \n and \r, never inside a JSON string (str.splitlines
    # would also split on U+2028 and friends, which JSON allows unescaped).
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise SeedError(f"{src}:{lineno}: not UTF-8 text ({e.reason})") from e
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SeedError(f"{src}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise SeedError(f"{src}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _detect(src: Path, lineno: int, obj: Json) -> str:
    if "messages" in obj or "conversations" in obj:
        return "jsonl"
    if "prompt" in obj or ("message_id" in obj and "parent_id" in obj):
        return "oasst"
    keys = ", ".join(sorted(obj)) or "none"
    raise SeedError(
        f"{src}:{lineno}: unknown seed format (keys: {keys}); "
        "expected 'messages', 'conversations', an OASST tree or OASST messages"
    )


def _role(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    return SYSTEM_ROLE if name == SYSTEM_ROLE else ROLE_ALIASES.get(name)


def _text(src: Path, lineno: int, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SeedError(f"{src}:{lineno}: {what} has no text")
    # One line per turn, as ChatFormat.clean_generation leaves generated turns: a blank
    # line inside a seed would otherwise teach the model to end its turn there.
    return " ".join(value.split())


def _lang_ok(obj: Json, lang: str | None) -> bool:
    got = obj.get("lang", obj.get("language"))
    return lang is None or got is None or got == lang


def _parse_jsonl(
    src: Path, lines: Iterable[tuple[int, Json]], lang: str | None, dropped: Counter[str]
) -> Parsed:
    for lineno, obj in lines:
        text_keys: tuple[str, ...]
        if "messages" in obj:
            items, role_key, text_keys = obj["messages"], "role", ("text", "content")
        elif "conversations" in obj:
            items, role_key, text_keys = obj["conversations"], "from", ("value",)
        else:
            raise SeedError(f"{src}:{lineno}: expected a 'messages' or 'conversations' list")
        if not isinstance(items, list):
            raise SeedError(f"{src}:{lineno}: 'messages'/'conversations' must be a list")
        if not _lang_ok(obj, lang):
            dropped["other language"] += 1
            continue
        turns: list[Turn] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise SeedError(f"{src}:{lineno}: message {i} is not a JSON object")
            raw = next((item[k] for k in text_keys if k in item), None)
            turns.append((_role(item.get(role_key)), _text(src, lineno, raw, f"message {i}")))
        conv_id = str(obj["id"]) if obj.get("id") not in (None, "") else f"{src.name}:{lineno}"
        yield lineno, conv_id, turns


def _parse_oasst(
    src: Path, lines: Iterable[tuple[int, Json]], lang: str | None, dropped: Counter[str]
) -> Parsed:
    def keep(node: Json) -> bool:
        # A deleted or other-language message ends the path before it: its replies
        # answer a turn that is not in the conversation.
        return not node.get("deleted") and _lang_ok(node, lang)

    flat: dict[str, tuple[int, Json]] = {}
    for lineno, obj in lines:
        if "prompt" in obj:
            root = obj["prompt"]
            if not isinstance(root, dict):
                raise SeedError(f"{src}:{lineno}: 'prompt' must be a JSON object")
            tree_id = str(obj.get("message_tree_id") or _msg_id(src, lineno, root))
            for path in _paths(root, partial(_replies, src, lineno), keep):
                yield _oasst_conv(src, lineno, tree_id, path)
        elif "message_id" in obj:
            if "parent_id" not in obj:
                raise SeedError(f"{src}:{lineno}: OASST message without 'parent_id'")
            mid = _msg_id(src, lineno, obj)
            if not keep(obj):
                continue  # its whole subtree is cut, so it need not be held
            if mid in flat:
                raise SeedError(
                    f"{src}:{lineno}: duplicate message_id {mid!r} (first at line {flat[mid][0]})"
                )
            _text(src, lineno, obj.get("text"), f"message {mid!r}")
            flat[mid] = (lineno, obj)
        else:
            raise SeedError(
                f"{src}:{lineno}: expected an OASST tree ('prompt') "
                "or an OASST message ('message_id', 'parent_id')"
            )
    children: dict[str, list[Json]] = {}
    for _, obj in flat.values():
        if obj["parent_id"] is not None:
            children.setdefault(str(obj["parent_id"]), []).append(obj)
    for lineno, obj in flat.values():
        if obj["parent_id"] is None:
            tree_id = str(obj.get("message_tree_id") or obj["message_id"])
            for path in _paths(obj, lambda n: children.get(str(n["message_id"]), []), keep):
                yield _oasst_conv(src, lineno, tree_id, path)


def _msg_id(src: Path, lineno: int, node: Json) -> str:
    mid = node.get("message_id")
    if not isinstance(mid, str | int) or mid == "":
        raise SeedError(f"{src}:{lineno}: OASST message without a 'message_id'")
    return str(mid)


def _replies(src: Path, lineno: int, node: Json) -> list[Json]:
    replies = node.get("replies") or []
    if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
        raise SeedError(f"{src}:{lineno}: 'replies' must be a list of JSON objects")
    return replies


def _paths(
    root: Json, children: Callable[[Json], list[Json]], keep: Callable[[Json], bool]
) -> Iterator[list[Json]]:
    """Every root-to-leaf path of kept nodes, depth first, replies in file order."""
    if not keep(root):
        return
    # An explicit stack: tree depth comes from the input and must not hit the recursion limit.
    stack = [[root]]
    while stack:
        path = stack.pop()
        kids = [c for c in children(path[-1]) if keep(c)]
        if not kids:
            yield path
        stack.extend([*path, c] for c in reversed(kids))


def _oasst_conv(
    src: Path, lineno: int, tree_id: str, path: list[Json]
) -> tuple[int, str, list[Turn]]:
    turns: list[Turn] = []
    for node in path:
        text = _text(src, lineno, node.get("text"), f"message {_msg_id(src, lineno, node)!r}")
        turns.append((_role(node.get("role")), text))
    return lineno, f"{tree_id}:{_msg_id(src, lineno, path[-1])}", turns


def _unusable(turns: list[Turn]) -> str | None:
    """Why a conversation cannot be a seed, or None when it can."""
    chat = [(role, text) for role, text in turns if role != SYSTEM_ROLE]
    if any(role is None for role, _ in chat):
        return "unknown role"
    if any(not text for _, text in chat):
        return "empty message"
    if len(chat) < 2:
        return "fewer than 2 messages"
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, (role, _) in enumerate(chat)):
        return "not alternating from user"
    return None
