"""The refinement of an existing chat corpus (method.md §4), as small steps.

``refine_file(path, fmt)`` runs it on a file; ``Refiner(...).run(conversations)``
runs it on any stream of ``RawConversation``s. Each conversation goes through
every step before the next one is read, in the paper's order; a drop ends its way
and is counted under exactly one key, so that ``input_conversations`` equals
``output_conversations`` plus the four ``dropped_*`` counts (``dropped_empty``,
``dropped_bad_alternation``, ``dropped_duplicate_heavy``, ``dropped_non_target``).

1. Tags (``fix_tags``, Fauno/Baize transcripts only). A tag-like token is an
   opening ``[|``, ``[`` or ``|``, a tag name (any case), a closing ``|]``, ``]``
   or ``|``, with spaces or tabs allowed between all parts, and at least three of
   the four delimiter characters ``[ | | ]``. Each such token that is not exactly
   the canonical tag is rewritten to it and counted in ``tags_fixed``: ``[| Umano |]``,
   ``[ |AI|]``, ``[|AI |]``, ``[|umano|]``, ``[|AI]``, ``|AI|]``, ``[|AI|``, ``[AI|]``.
   ``[AI]`` or ``| AI |`` (two delimiters) stay text: a citation or a table cell
   is likelier than a tag. Tag names: Fauno ``Umano`` and ``AI``, plus the
   untranslated ``Human`` (rewritten to ``Umano``); Baize ``Human`` and ``AI``.
   The transcript is then split on the canonical tags: the text before the first
   tag is the system line, each tag starts a turn (Umano/Human: user, AI:
   assistant), and a last turn with no text is the end marker and is removed.
2. Empty (``dropped_empty``): no turn has text.
3. Alternation (``dropped_bad_alternation``): the turns must be user, assistant,
   user, ..., ending with the assistant (complete exchanges only), every turn
   with text and a known role. System prompts are not turns.
4. Duplicates (``dropped_duplicate_heavy``): a message is duplicated when its text,
   whitespace-normalised (stripped, runs of whitespace collapsed to one space),
   has the xxh64 hash of a message seen earlier: earlier in the same
   conversation, or in an earlier conversation that step 4 kept. Messages of
   conversations dropped by any step are never "seen": a conversation is only
   dropped as a copy of content that stays, so the first copy always survives
   (unless it repeats itself). A conversation with more than half of its
   messages duplicated is dropped; exactly half survives. OASST paths of one
   tree share their first messages: a message (by tree and message id) already
   judged in an earlier path is the same message, not a copy, and is left out
   of both counts of the later path.
5. Language (``non_target_language_messages``): every message is judged:
   a declared language (OASST ``lang``, its primary subtag) decides; otherwise
   Lingua does, on the text without its code (``strip_code``: fenced blocks,
   indented blocks, inline code spans), except when what is left is shorter
   than ``min_chars`` (stripped): it passes. So a message that is only code is
   never non-target, and an explanation around a code block is judged on its
   prose. The messages found are counted and, by default, kept, as the paper
   did: its English hits were mostly code and Italian sentences holding English
   names. With ``cut_non_target`` the conversation is cut before the exchange
   (user turn and its answer) holding its first non-target message: later
   turns answer it and cannot stay without it. The cut keeps alternation; the
   messages it removes are counted in ``cut_non_target_messages``, and a
   conversation cut to nothing (its first exchange holds one) is dropped and
   counted in ``dropped_non_target``. The count of non-target messages does not
   depend on ``cut_non_target``. System prompts are not judged: step 6 removes
   them whatever their language.
6. System prompts (``system_prompts_removed``): the prompts present in the
   conversations that reach this step (a Fauno/Baize system line, jsonl
   ``system`` field and ``system`` messages) are removed and counted; those of
   dropped conversations left with them and are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash

from corpusfactory.chatformat import Message
from corpusfactory.engines.language import LanguageCheck
from corpusfactory.errors import UsageError
from producers.ingest.formats import RawConversation, Turn, read_conversations

# Tag names as written (lower case) -> the canonical name, per transcript format.
TAG_NAMES: dict[str, dict[str, str]] = {
    "fauno": {"umano": "Umano", "human": "Umano", "ai": "AI"},
    "baize": {"human": "Human", "ai": "AI"},
}
TAG_ROLES = {"Umano": "user", "Human": "user", "AI": "assistant"}


def _tag_like(names: Iterable[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(
        rf"(?P<open>\[[ \t]*\|?|\|)[ \t]*(?P<name>{alternatives})[ \t]*(?P<close>\|?[ \t]*\]|\|)",
        re.IGNORECASE,
    )


def _canonical(names: Iterable[str]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(f"[|{n}|]") for n in sorted(set(names))) + ")")


_TAG_LIKE = {fmt: _tag_like(names) for fmt, names in TAG_NAMES.items()}
_TAG = {fmt: _canonical(names.values()) for fmt, names in TAG_NAMES.items()}


@dataclass
class IngestReport:
    """The counts of one refinement; ``as_dict`` gives its JSON keys, in this order."""

    input_conversations: int = 0
    tags_fixed: int = 0
    dropped_empty: int = 0
    dropped_bad_alternation: int = 0
    dropped_duplicate_heavy: int = 0
    dropped_non_target: int = 0  # cut to nothing (only with cut_non_target)
    system_prompts_removed: int = 0
    non_target_language_messages: int = 0
    cut_non_target_messages: int = 0  # removed by the cut (only with cut_non_target)
    output_conversations: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class RefinedConversation:
    id: str
    source: str  # the format it was read as
    messages: tuple[Message, ...]

    def as_dict(self) -> dict[str, Any]:
        messages = [{"role": m.role, "text": m.text} for m in self.messages]
        return {"id": self.id, "source": self.source, "messages": messages}


# -- the steps ---------------------------------------------------------------------


def fix_tags(transcript: str, fmt: str) -> tuple[str, int]:
    """Step 1: the transcript with every broken turn tag rewritten, and how many were."""
    names = TAG_NAMES[fmt]
    fixed = 0

    def repair(m: re.Match[str]) -> str:
        nonlocal fixed
        if sum(c in "[|]" for c in m["open"] + m["close"]) < 3:
            return m[0]  # "[AI]", "| AI |": prose, not a tag
        tag = f"[|{names[m['name'].lower()]}|]"
        if tag != m[0]:
            fixed += 1
        return tag

    return _TAG_LIKE[fmt].sub(repair, transcript), fixed


def split_transcript(transcript: str, fmt: str) -> tuple[tuple[str, ...], list[Turn]]:
    """Step 1, after ``fix_tags``: (system prompts, turns without the end marker)."""
    head, *parts = _TAG[fmt].split(transcript)
    turns = [
        Turn(TAG_ROLES[tag[2:-2]], text.strip())
        for tag, text in zip(parts[::2], parts[1::2], strict=True)
    ]
    if turns and not turns[-1].text:
        turns.pop()  # the empty tag that ends every transcript
    return ((head.strip(),) if head.strip() else ()), turns


def is_empty(turns: list[Turn]) -> bool:
    """Step 2."""
    return not any(t.text for t in turns)


def alternates(turns: list[Turn]) -> bool:
    """Step 3: complete user/assistant exchanges, every turn with text."""
    roles = [t.role for t in turns]
    return (
        bool(turns)
        and roles == ["user", "assistant"] * (len(turns) // 2)
        and all(t.text for t in turns)
    )


def message_hash(text: str) -> int:
    return xxhash.xxh64_intdigest(" ".join(text.split()).encode("utf-8"))


class DuplicateIndex:
    """Step 4: the hashes of the messages kept so far, and the rule."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._judged_uids: set[str] = set()  # OASST messages already judged in a path

    def is_heavy(self, turns: list[Turn]) -> bool:
        """Whether more than half of the messages are duplicated; remembers them if not."""
        own = [t for t in turns if t.uid is None or t.uid not in self._judged_uids]
        self._judged_uids.update(t.uid for t in turns if t.uid is not None)
        hashes: set[int] = set()
        duplicated = 0
        for turn in own:
            h = message_hash(turn.text)
            if h in self._seen or h in hashes:
                duplicated += 1
            hashes.add(h)
        if 2 * duplicated > len(own):
            return True
        self._seen |= hashes
        return False


_FENCE_OPEN = re.compile(r"^\s*(`{3,}(?=[^`]*$)|~{3,})")  # "```py", not "```x```"
_FENCE_CLOSE = re.compile(r"^\s*(`{3,}|~{3,})\s*$")
_INDENTED = re.compile(r"^(?: {4}|\t)")
_INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")  # within a line


def strip_code(text: str) -> str:
    """Step 5: the text without its code, the part that is judged for its language.

    Removed: fenced blocks (from a line opening with three or more backticks or
    tildes, after any indentation, to the line closing with at least as many of
    the same, or to the end when none does; a line such as ```` ```x()``` ```` is
    no opening but an inline span); indented blocks (lines starting with
    four spaces or a tab, from one that follows a blank line, a fenced block or
    the start of the text, up to the next line that is neither blank nor
    indented: an indented line right after prose continues the prose); inline
    code spans (a run of backticks, text on the same line, a run of the same
    length).
    """
    kept: list[str] = []
    fence: str | None = None  # the opening run while inside a fenced block
    after_break = True  # an indented line here starts (or continues) a code block
    for line in text.splitlines():
        if fence is not None:
            close = _FENCE_CLOSE.match(line)
            if close and close[1][0] == fence[0] and len(close[1]) >= len(fence):
                fence, after_break = None, True
            continue
        opening = _FENCE_OPEN.match(line)
        if opening:
            fence = opening[1]
            continue
        if not line.strip():
            after_break = True
            kept.append("")
        elif after_break and _INDENTED.match(line):
            continue
        else:
            after_break = False
            kept.append(line)
    return _INLINE_CODE.sub(" ", "\n".join(kept))


class LanguageJudge:
    """Step 5's question for one message: is it in the target language?"""

    def __init__(self, language: str, min_chars: int) -> None:
        self.language = language.strip().lower()
        self._check = LanguageCheck(self.language, min_chars)

    def in_target(self, turn: Turn) -> bool:
        if turn.lang is not None:
            return re.split(r"[-_]", turn.lang.lower())[0] == self.language
        return self._check.ok(strip_code(turn.text))


def cut_before_non_target(turns: list[Turn], in_target: list[bool]) -> list[Turn]:
    """Step 5: the exchanges before the one holding the first non-target message."""
    first = next((i for i, ok in enumerate(in_target) if not ok), len(turns))
    return turns[: first - first % 2]  # user turns are at even positions (step 3)


# -- the pipeline ------------------------------------------------------------------


class Refiner:
    """Runs the steps over a stream of conversations and counts in ``self.report``."""

    def __init__(
        self, *, language: str = "it", min_chars: int = 20, cut_non_target: bool = False
    ) -> None:
        if min_chars < 1:
            raise UsageError(f"min_chars must be at least 1, got {min_chars}")
        self.report = IngestReport()
        self.cut_non_target = cut_non_target
        self._language = LanguageJudge(language, min_chars)
        self._duplicates = DuplicateIndex()

    def run(self, conversations: Iterable[RawConversation]) -> Iterator[RefinedConversation]:
        for raw in conversations:
            refined = self.refine(raw)
            if refined is not None:
                yield refined

    def refine(self, raw: RawConversation) -> RefinedConversation | None:
        """One conversation through every step: the survivor, or None when dropped."""
        report = self.report
        report.input_conversations += 1
        system, turns = self._turns(raw)
        if is_empty(turns):
            report.dropped_empty += 1
            return None
        if not alternates(turns):
            report.dropped_bad_alternation += 1
            return None
        if self._duplicates.is_heavy(turns):
            report.dropped_duplicate_heavy += 1
            return None
        in_target = [self._language.in_target(t) for t in turns]
        report.non_target_language_messages += in_target.count(False)
        if self.cut_non_target:
            kept = cut_before_non_target(turns, in_target)
            report.cut_non_target_messages += len(turns) - len(kept)
            if not kept:
                report.dropped_non_target += 1
                return None
            turns = kept
        report.system_prompts_removed += len(system)
        report.output_conversations += 1
        return RefinedConversation(raw.id, raw.source, _messages(turns))

    def _turns(self, raw: RawConversation) -> tuple[tuple[str, ...], list[Turn]]:
        if raw.transcript is None:
            return raw.system, list(raw.turns)
        text, fixed = fix_tags(raw.transcript, raw.source)
        self.report.tags_fixed += fixed
        return split_transcript(text, raw.source)


def _messages(turns: list[Turn]) -> tuple[Message, ...]:
    out = []
    for turn in turns:
        assert turn.role is not None  # step 3 let only user/assistant turns through
        out.append(Message(turn.role, turn.text))
    return tuple(out)


def refine_file(
    path: str | Path,
    fmt: str,
    *,
    language: str = "it",
    min_chars: int = 20,
    cut_non_target: bool = False,
) -> tuple[list[RefinedConversation], dict[str, int]]:
    """Read ``path`` as ``fmt`` and refine it: (survivors in file order, the report)."""
    conversations = read_conversations(path, fmt)  # checks fmt before Lingua is built
    refiner = Refiner(language=language, min_chars=min_chars, cut_non_target=cut_non_target)
    kept = list(refiner.run(conversations))
    return kept, refiner.report.as_dict()
