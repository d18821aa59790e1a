"""The vLLM backend: vLLM's offline engine (``vllm.LLM``) in-process.

vLLM is imported lazily, in the constructor, so this module imports without it.
It needs a GPU build of vLLM (``pip install vllm``). Each prompt gets its own
``SamplingParams`` with a seed derived from ``params.seed``, the call counter and
the prompt's position, so identical prompts in one batch still differ and a
rerun reproduces the same outputs.
"""

from __future__ import annotations

import threading
from typing import Any

from corpusfactory.errors import GeneratorError
from corpusfactory.settings import GenerationSettings
from corpusfactory.text import cut_at_stop
from producers.generators.base import derive_seed


class VLLMGenerator:
    """``vllm.LLM(model=..., gpu_memory_utilization=..., seed=...)``."""

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise GeneratorError(
                f"the 'vllm' generator backend needs vLLM, which cannot be imported ({exc}); "
                "install it with: pip install vllm"
            ) from exc
        self._sampling_params_cls = vllm.SamplingParams
        try:
            self._llm: Any = vllm.LLM(
                model=model,
                gpu_memory_utilization=gpu_memory_utilization,
                seed=seed,
                **engine_kwargs,
            )
        except Exception as exc:  # vLLM raises many types while starting its engine
            raise GeneratorError(
                f"vllm generator: cannot start the engine for {model}: {exc}"
            ) from exc
        self._calls = 0
        self._lock = threading.Lock()
        self.id = f"vllm:{model}"

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        if self._llm is None:
            raise GeneratorError("vllm generator: generate() after close()")
        if not prompts:
            return []
        stops = [s for s in stop if s]
        with self._lock:
            call = self._calls
            self._calls += 1
            sampling = [
                self._sampling_params_cls(
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=params.max_new_tokens,
                    stop=stops or None,
                    seed=derive_seed(params.seed, call, i),
                )
                for i in range(len(prompts))
            ]
            try:
                outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
            except Exception as exc:
                raise GeneratorError(f"vllm generator failed: {exc}") from exc
        if len(outputs) != len(prompts):
            raise GeneratorError(
                f"vllm generator: {len(outputs)} outputs for {len(prompts)} prompts"
            )
        # LLM.generate returns outputs in the order of the prompts.
        return [cut_at_stop(o.outputs[0].text if o.outputs else "", stops) for o in outputs]

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            del llm
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass
