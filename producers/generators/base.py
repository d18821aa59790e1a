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
import importlib.util
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from corpusfactory.errors import GeneratorError
from corpusfactory.settings import GenerationSettings, ProducerSettings

# backend -> (modules it imports, the command that installs them)
_REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "transformers": (("torch", "transformers"), "pip install torch transformers"),
    "llamacpp": (("llama_cpp",), "pip install llama-cpp-python"),
    "openai": (("httpx",), "pip install httpx"),
    "vllm": (("vllm",), "pip install vllm"),
}


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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for s in stop:
        if s:
            pos = text.find(s)
            if pos != -1 and pos < cut:
                cut = pos
    return text[:cut]


def require_backend(backend: str) -> None:
    """Raise GeneratorError naming the install command when a backend's package is missing."""
    try:
        modules, install = _REQUIREMENTS[backend]
    except KeyError:
        raise GeneratorError(
            f"unknown generator backend {backend!r}; choose one of {sorted(_REQUIREMENTS)}"
        ) from None
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise GeneratorError(
            f"the {backend!r} generator backend needs {', '.join(missing)}, which is not "
            f"installed; install it with: {install}  "
            f"(or choose another backend with producer.backend)"
        )


def make_generator(settings: ProducerSettings, model: str, device: str) -> Generator:
    """Build the generator that ``settings.backend`` names.

    ``model`` is a local model directory for ``transformers`` and ``vllm`` (or a hub
    id vLLM can resolve), a ``.gguf`` file for ``llamacpp`` (resolve a model name
    with ``form="gguf"``), and the served model name for ``openai`` unless
    ``settings.openai_model`` is set. ``device`` is a torch device for
    ``transformers``; the other backends ignore it (the server, llama.cpp on CPU or
    vLLM decides).
    """
    backend = settings.backend
    require_backend(backend)
    if backend == "transformers":
        from producers.generators.hf import HFGenerator

        return HFGenerator(model, device=device, dtype=settings.dtype)
    if backend == "llamacpp":
        from producers.generators.llamacpp import LlamaCppGenerator

        return LlamaCppGenerator(
            model,
            threads=settings.llamacpp_threads,
            n_ctx=settings.llamacpp_n_ctx,
            batch=settings.llamacpp_batch or settings.in_flight,
        )
    if backend == "openai":
        from producers.generators.openai_compat import OpenAICompatGenerator

        return OpenAICompatGenerator(
            base_url=settings.openai_base_url,
            model=settings.openai_model or model,
            api_key=settings.openai_api_key,
            max_retries=settings.openai_max_retries,
            timeout_s=settings.openai_timeout_s,
        )
    if backend == "vllm":
        from producers.generators.vllm_engine import VLLMGenerator

        return VLLMGenerator(model, seed=settings.generation.seed)
    raise GeneratorError(f"unknown generator backend {backend!r}")  # pragma: no cover
