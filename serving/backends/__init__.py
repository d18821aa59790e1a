"""Serving backends: one narrow interface, one implementation per engine.

``load_backend(kind, path, settings)`` picks the engine:

* ``full`` (a Hugging Face model directory): vLLM when ``import vllm`` works,
  transformers otherwise (``engine=`` forces one);
* ``gguf`` (a ``.gguf`` file): llama.cpp.

Engine modules are imported only when chosen, so importing this package loads
neither torch nor llama.cpp.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from corpusfactory.settings import ServingSettings
from serving.backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    ContextLengthError,
    FinishReason,
    GenerationParams,
    Piece,
    StopCutter,
    TextStream,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "ContextLengthError",
    "FinishReason",
    "GenerationParams",
    "Piece",
    "StopCutter",
    "TextStream",
    "load_backend",
    "vllm_available",
]

Engine = Literal["transformers", "vllm", "llama.cpp"]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_backend(
    kind: Literal["full", "gguf"],
    path: str | Path,
    settings: ServingSettings,
    *,
    model_id: str | None = None,
    engine: Engine | None = None,
) -> Backend:
    """Load the model at ``path`` in the engine for ``kind``. Blocking: call it off the loop."""
    if kind == "gguf":
        if engine not in (None, "llama.cpp"):
            raise BackendError(f"a gguf build is served by llama.cpp, not {engine}")
        from serving.backends.llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(
            path, model_id=model_id, n_ctx=settings.n_ctx, n_threads=settings.n_threads
        )
    if kind != "full":
        raise BackendError(f"unknown backend kind {kind!r}: use 'full' or 'gguf'")
    chosen = engine or ("vllm" if vllm_available() else "transformers")
    if chosen == "vllm":
        from serving.backends.vllm_backend import VLLMBackend

        return VLLMBackend(str(path), model_id=model_id)
    if chosen == "transformers":
        from serving.backends.transformers_backend import TransformersBackend

        return TransformersBackend(path, model_id=model_id, n_ctx=settings.n_ctx)
    raise BackendError(f"a full-precision model is served by vllm or transformers, not {chosen}")
