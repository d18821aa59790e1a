"""The generator interface shared by every text-generation backend.

A generator turns a batch of prompts into their raw continuations. It is
BLOCKING: the producer calls ``generate`` in an executor thread, never on the
event loop. Four backends exist:

* ``transformers`` (:mod:`producers.generators.hf`): a local causal LM in-process;
* ``llamacpp`` (:mod:`producers.generators.llamacpp`): a GGUF file in-process on CPU
  with llama.cpp, the prompts of a call decoded together;
* ``openai`` (:mod:`producers.generators.openai_compat`): any OpenAI-compatible
  ``/completions`` server (vLLM, llama.cpp server, ...);
* ``vllm`` (:mod:`producers.generators.vllm_engine`): vLLM's offline engine in-process.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

from corpusfactory.settings import GenerationSettings


@runtime_checkable
class Generator(Protocol):
    """A text generator. ``id`` names it in the ``generator`` field of events."""

    id: str

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        """The raw continuation of each prompt, in prompt order (blocking).

        Each continuation is cut before the first occurrence of any ``stop`` string.
        Raises ``GeneratorError`` when the backend fails.
        """
        ...

    def close(self) -> None:
        """Release the model, connections or GPU memory. Idempotent."""
        ...


def derive_seed(base: int, *parts: int) -> int:
    """A 31-bit seed derived from ``base`` and counters, stable across runs and platforms.

    Backends use it with a per-call counter so that a regeneration (the same prompt
    after a rejection) samples something new, while a rerun reproduces the same
    sequence of outputs.
    """
    key = ":".join(str(x) for x in (base, *parts)).encode("ascii")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & 0x7FFF_FFFF
