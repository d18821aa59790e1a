"""Build the generator a producer setting names: :func:`make_generator` checks the
backend's package is installed (:func:`require_backend`) and imports only that
backend, so a llama.cpp producer never imports torch.
"""

from __future__ import annotations

import importlib.util

from corpusfactory.errors import GeneratorError
from corpusfactory.settings import ProducerSettings
from producers.generators.base import Generator

# backend -> (modules it imports, the command that installs them)
_REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "transformers": (("torch", "transformers"), "pip install torch transformers"),
    "llamacpp": (("llama_cpp",), "pip install llama-cpp-python"),
    "openai": (("httpx",), "pip install httpx"),
    "vllm": (("vllm",), "pip install vllm"),
}


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

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)  # this process's torch
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
