"""The chat format shared by producers, training and serving.

A conversation is rendered as turns marked by role tags, the format of the
released Cerbero model (method.md §5): ``[|Umano|] ...`` / ``[|Assistente|] ...``,
no system message, one turn per line block. Tags are configurable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    text: str


@dataclass(frozen=True)
class ChatFormat:
    user_tag: str = "[|Umano|]"
    assistant_tag: str = "[|Assistente|]"

    def tag(self, role: str) -> str:
        if role == "user":
            return self.user_tag
        if role == "assistant":
            return self.assistant_tag
        raise ValueError(f"unknown role {role!r}")

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end a generated turn: the start of any tag."""
        return [self.user_tag, self.assistant_tag, "[|"]

    def render(self, messages: Iterable[Message]) -> str:
        """Whole conversation, each turn as 'TAG text' on its own line."""
        return "\n".join(f"{self.tag(m.role)} {m.text.strip()}" for m in messages)

    def prompt(
        self,
        history: Sequence[Message],
        next_role: str,
        examples: Sequence[Sequence[Message]] = (),
    ) -> str:
        """A prompt: example conversations, a blank line, the history, then the next tag."""
        parts = [self.render(ex) for ex in examples]
        body = self.render(history)
        opener = self.tag(next_role)
        parts.append(f"{body}\n{opener}" if body else opener)
        return "\n\n".join(parts)

    def clean_generation(self, text: str) -> str:
        """Cut a generated continuation at the first tag or blank line; strip it."""
        cut = len(text)
        for stop in [*self.stop_strings, "\n\n"]:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
        return " ".join(text[:cut].split())
