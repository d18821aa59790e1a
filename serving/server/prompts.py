"""From OpenAI chat messages to the training chat format, and back to a clean reply.

The served models were trained on ``[|Umano|] ...`` / ``[|Assistente|] ...``
turns with no system message, so the chat template IS ``ChatFormat``:

* ``system`` (and ``developer``) messages, wherever they appear, are joined with
  newlines and prepended, followed by a newline, to the first user turn that is
  sent to the model. If history is trimmed, they move to the first kept user turn,
  so they are never dropped.
* The conversation must end with a user message: the reply is the next
  assistant turn (``ChatFormat.prompt(history, "assistant")``).
* When the prompt does not fit, the oldest turns are dropped (a user turn and
  the replies after it at a time) until it leaves room for the reply.
* The reply stops at any role tag or a blank line (``ChatFormat.stop_strings``
  plus ``"\\n\\n"``, and the request's own ``stop``), and is stripped of the
  space after the tag and of trailing whitespace (``ReplyTidier``), like
  ``ChatFormat.clean_generation`` but without folding inner whitespace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corpusfactory.chatformat import ChatFormat, Message
from serving.backends.base import ContextLengthError

SYSTEM_ROLES = ("system", "developer")


class ChatRequestError(ValueError):
    """The messages cannot be rendered in the training format."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    tokens: int
    dropped_turns: int


def split_messages(messages: Sequence[tuple[str, str]]) -> tuple[str, list[Message]]:
    """(role, text) pairs -> (system text, user/assistant turns). Checks the shape."""
    system = "\n".join(t.strip() for r, t in messages if r in SYSTEM_ROLES and t.strip())
    turns = [Message(r, t) for r, t in messages if r not in SYSTEM_ROLES]
    if not turns or turns[-1].role != "user":
        raise ChatRequestError("the last non-system message must come from the user")
    return system, turns


def with_system(system: str, turns: Sequence[Message]) -> list[Message]:
    """Prepend the system text to the first user turn."""
    out = list(turns)
    if system:
        first = next(i for i, m in enumerate(out) if m.role == "user")
        out[first] = Message("user", f"{system}\n{out[first].text.strip()}")
    return out


def build_chat_prompt(
    messages: Sequence[tuple[str, str]],
    fmt: ChatFormat,
    count_tokens: Callable[[str], int],
    budget: int,
) -> ChatPrompt:
    """The longest recent history whose prompt has at most ``budget`` tokens."""
    system, turns = split_messages(messages)
    dropped = 0
    while True:
        text = fmt.prompt(with_system(system, turns), "assistant")
        tokens = count_tokens(text)
        if tokens <= budget:
            return ChatPrompt(text, tokens, dropped)
        # Drop the oldest user turn and everything up to the next one.
        later_users = [i for i, m in enumerate(turns) if m.role == "user" and i > 0]
        if not later_users:
            raise ContextLengthError(
                f"the last user message (with the system text) takes {tokens} tokens; "
                f"at most {budget} fit: shorten it"
            )
        dropped += later_users[0]
        turns = turns[later_users[0] :]


def chat_stops(fmt: ChatFormat, extra: Sequence[str]) -> tuple[str, ...]:
    """A reply ends at any role tag, a blank line, or a stop string of the request."""
    return tuple(dict.fromkeys([*fmt.stop_strings, "\n\n", *extra]))


class ReplyTidier:
    """Strips a streamed reply: leading whitespace, and trailing whitespace at the end.

    Whitespace at the end of a piece is held back until more text follows, so
    the concatenated stream equals the stripped reply and nothing is re-sent.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        out = self._held + body
        self._held = text[len(body) :]
        return out
