"""The narrow interface every serving engine implements.

A backend turns one prompt into a stream of decoded text pieces. Engines differ
(transformers, llama.cpp, vLLM); what the server needs from them does not:

* ``Backend.generate_stream(prompt, params)`` returns a ``TextStream``: an
  ``Iterator[str]`` of text pieces, already cut at the first stop string, that
  knows afterwards why it ended (``finish_reason``) and how many tokens it used;
* ``count_tokens(text)`` counts tokens the way the engine feeds them (BOS included);
* ``close()`` frees the model; it is idempotent.

Stop strings are cut here, once, for every engine (``StopCutter``): the engines
only generate and decode. Iterating a ``TextStream`` blocks (the engine works in
its own thread); the server calls ``next`` from a worker thread, never from the
event loop. Closing a stream early cancels the generation in the engine.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from corpusfactory.errors import ModelError

FinishReason = Literal["stop", "length"]


class BackendError(ModelError):
    """A serving backend failed to load or to generate."""


class BackendUnavailableError(BackendError):
    """The engine's Python package is not installed; the message says how to install it."""


class ContextLengthError(BackendError):
    """The prompt does not fit in the model's context window."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one request. ``temperature == 0`` means greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Piece:
    """What an engine emits: decoded text, the tokens it accounts for, and at the end why."""

    text: str
    tokens: int = 0
    finish_reason: FinishReason | None = None


class StopCutter:
    """Cuts a text stream at the first stop string, holding back what may start one.

    ``feed`` returns the text that is safe to emit and whether a stop was found;
    text that could be the beginning of a stop string waits for the next piece.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self._buf += text
        hits = [p for p in (self._buf.find(s) for s in self._stops) if p != -1]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self._stops:
            # The longest tail of the buffer that is a proper prefix of this stop.
            for k in range(min(len(stop) - 1, len(self._buf)), hold, -1):
                if self._buf.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self._buf) - hold
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (no stop string followed)."""
        out, self._buf = self._buf, ""
        return out


class TextStream(Iterator[str]):
    """The text of one generation, piece by piece, cut at the first stop string.

    After exhaustion ``finish_reason`` is "stop" (stop string or end of sequence)
    or "length" (``max_tokens`` reached); ``completion_tokens`` counts what the
    engine generated. Thread-safe: ``close`` may come from another thread.
    """

    def __init__(
        self, pieces: Generator[Piece, None, None], stop: Sequence[str], prompt_tokens: int
    ) -> None:
        self._pieces = pieces
        self._cutter = StopCutter(stop)
        self._lock = threading.Lock()
        self._done = False
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def __next__(self) -> str:
        with self._lock:
            while not self._done:
                try:
                    piece = next(self._pieces)
                except StopIteration:
                    self._done = True
                    self.finish_reason = self.finish_reason or "stop"
                    tail = self._cutter.flush()
                    if tail:
                        return tail
                    break
                self.completion_tokens += piece.tokens
                self.finish_reason = piece.finish_reason or self.finish_reason
                out, stopped = self._cutter.feed(piece.text)
                if stopped:
                    self._done = True
                    self.finish_reason = "stop"
                    self._pieces.close()  # cancels the engine's work
                if out:
                    return out
            raise StopIteration

    def close(self) -> None:
        """Stop early: the engine cancels the generation. Idempotent."""
        with self._lock:
            self._done = True
            self._pieces.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """One loaded model in one engine. Subclasses implement ``_generate`` and ``_release``."""

    kind: ClassVar[str]  # the engine: "transformers", "llama.cpp", "vllm"

    def __init__(self, model_id: str) -> None:
        self.id = model_id
        self.created = int(time.time())
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """The context window in tokens: prompt plus completion."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as a prompt (with the BOS token where the engine adds one)."""

    @abstractmethod
    def _generate(self, prompt: str, params: GenerationParams) -> Generator[Piece, None, None]:
        """Pieces of decoded text; closing the generator must cancel the engine's work."""

    @abstractmethod
    def _release(self) -> None:
        """Free the model (called once, by ``close``)."""

    def generate_stream(self, prompt: str, params: GenerationParams) -> TextStream:
        """Start generating; ``max_tokens`` is clipped to what the context window leaves."""
        if self._closed:
            raise BackendError(f"backend {self.id} is closed")
        prompt_tokens = self.count_tokens(prompt)
        room = self.n_ctx - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; the model {self.id} has a context "
                f"of {self.n_ctx}: shorten the prompt"
            )
        clipped = replace(params, max_tokens=min(params.max_tokens, room))
        return TextStream(self._generate(prompt, clipped), params.stop, prompt_tokens)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} ({self.kind}){' closed' if self._closed else ''}>"
