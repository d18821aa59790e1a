"""GGUF serving with llama.cpp (llama-cpp-python), on CPU.

``Llama(model_path, n_ctx, n_threads, verbose=False)`` loads one GGUF build;
each request streams ``create_completion(prompt, stream=True)`` in a producer
thread that hands pieces to the reader through a queue. A ``Llama`` holds one
context and is not thread-safe, so a lock lets one generation run at a time.
Stop strings are not given to llama.cpp: ``TextStream`` cuts them, as for every
backend, and closing the stream cancels the generation at the next token.

Sampling is set to match the other backends: no top-k, no min-p, no repetition
penalty; ``temperature == 0`` is greedy. Install: ``pip install llama-cpp-python``.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from serving.backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    FinishReason,
    GenerationParams,
    Piece,
)

_END = object()


class LlamaCppBackend(Backend):
    """One GGUF file served by llama.cpp."""

    kind = "llama.cpp"

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
    ) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the gguf backend needs llama-cpp-python, which cannot be imported ({exc}); "
                "install it with: pip install llama-cpp-python"
            ) from exc
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise BackendError(f"llama.cpp backend: GGUF file {path} does not exist")
        super().__init__(model_id or path.stem)
        self._criteria_cls = llama_cpp.StoppingCriteriaList
        trained = trained_context(path)
        if trained is not None and n_ctx > trained:
            # Positions past the trained context give garbage; llama.cpp only warns.
            n_ctx = trained
        try:
            self._llm: Any = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"llama.cpp backend: cannot load {path}: {exc}") from exc
        self._n_ctx = int(self._llm.n_ctx())
        self._lock = threading.Lock()

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        # add_bos=True adds BOS only where the GGUF's vocabulary asks for it, as
        # create_completion does; special=True parses special tokens, as it does too.
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def _generate(self, prompt: str, params: GenerationParams) -> Generator[Piece, None, None]:
        pieces: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()
        # Lengths of the evaluated sequence at the first and the latest criterion call.
        # The k-th sampled token sees prompt + k - 1 tokens, and llama-cpp-python's one
        # extra call after the loop sees the same as its last, so this counts exactly.
        seen: list[int] = []

        def criterion(input_ids: Any, logits: Any) -> bool:
            if seen:
                seen[1] = len(input_ids)
            else:
                seen.extend((len(input_ids), len(input_ids)))
            return cancel.is_set()

        def sampled() -> int:
            return seen[1] - seen[0] + 1 if seen else 0

        # Without an explicit seed llama-cpp-python reuses the same one every call.
        seed = params.seed if params.seed is not None else random.getrandbits(32)

        def work() -> None:
            try:
                with self._lock:
                    if cancel.is_set():
                        return
                    if self._llm is None:
                        raise BackendError(f"llama.cpp backend {self.id} is closed")
                    chunks = self._llm.create_completion(
                        prompt,
                        max_tokens=params.max_tokens,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=0,
                        min_p=0.0,
                        repeat_penalty=1.0,
                        seed=seed,
                        stream=True,
                        stopping_criteria=self._criteria_cls([criterion]),
                    )
                    reported = 0
                    with contextlib.closing(chunks):
                        for chunk in chunks:
                            choice = chunk["choices"][0]
                            reason = choice.get("finish_reason")
                            finish: FinishReason | None = (
                                reason if reason in ("stop", "length") else None
                            )
                            now = sampled()
                            pieces.put(Piece(choice["text"], now - reported, finish))
                            reported = now
                            if cancel.is_set():
                                break
                    if sampled() > reported:
                        pieces.put(Piece("", sampled() - reported))
            except BaseException as exc:  # handed to the reader, not lost in the thread
                pieces.put(exc)
            finally:
                pieces.put(_END)

        thread = threading.Thread(target=work, name=f"generate:{self.id}", daemon=True)
        thread.start()
        try:
            while (item := pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    raise BackendError(f"llama.cpp backend {self.id}: {item}") from item
                yield item
        finally:
            cancel.set()

    def _release(self) -> None:
        with self._lock:  # after a generation still running
            llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def trained_context(path: Path) -> int | None:
    """The context length the model was trained with, from the GGUF metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    arch = fields.get("general.architecture")
    if arch is None:
        return None
    name = bytes(arch.parts[arch.data[0]]).decode("utf-8")
    ctx = fields.get(f"{name}.context_length")
    return int(ctx.parts[ctx.data[0]][0]) if ctx is not None else None
