"""Full-precision serving on a GPU with vLLM's ``AsyncLLMEngine`` (continuous batching).

The engine lives on its own asyncio loop in a background thread; each request
submits ``engine.generate`` there and reads the growing output through a queue,
so ``generate_stream`` keeps the plain blocking ``Iterator[str]`` contract of the
other backends, and concurrent requests are batched by vLLM. Closing a stream
cancels the request, which makes vLLM abort it.

Needs vLLM and a CUDA GPU: ``pip install vllm``. NOT exercised by the test suite
(no GPU build of vLLM on the test machine); ``load_backend`` picks it for
``backend: full`` only when ``import vllm`` works.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import uuid
from collections.abc import Generator
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


class VLLMBackend(Backend):
    """A Hugging Face model directory (or hub id) served by vLLM."""

    kind = "vllm"

    def __init__(self, model: str, *, model_id: str | None = None, **engine_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the vLLM backend needs vllm, which cannot be imported ({exc}); install it "
                "with: pip install vllm (a CUDA GPU is required), or serve with transformers"
            ) from exc
        super().__init__(model_id or model.rstrip("/").rsplit("/", 1)[-1])
        self._vllm = vllm
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-loop", daemon=True
        )
        self._thread.start()
        try:
            self._engine, self._tok, self._n_ctx = self._call(self._start(model, engine_kwargs))
        except Exception as exc:  # vLLM raises many types while starting its engine
            self._stop_loop()
            raise BackendError(f"vLLM backend: cannot start the engine for {model}: {exc}") from exc

    async def _start(self, model: str, kwargs: dict[str, Any]) -> tuple[Any, Any, int]:
        # Created on the engine's own loop: vLLM binds its background tasks to it.
        engine = self._vllm.AsyncLLMEngine.from_engine_args(
            self._vllm.AsyncEngineArgs(model=model, **kwargs)
        )
        tok = await _maybe_await(engine.get_tokenizer())
        config = await _maybe_await(engine.get_model_config())
        return engine, tok, int(config.max_model_len)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        return len(self._tok(text)["input_ids"])

    def _generate(self, prompt: str, params: GenerationParams) -> Generator[Piece, None, None]:
        out: queue.Queue[Any] = queue.Queue()
        sampling = self._vllm.SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
        )

        async def run() -> None:
            text_sent = tokens_sent = 0
            try:
                # Outputs are cumulative: send what is new since the last one.
                async for result in self._engine.generate(prompt, sampling, uuid.uuid4().hex):
                    done = result.outputs[0]
                    reason: FinishReason = "length" if done.finish_reason == "length" else "stop"
                    out.put(
                        Piece(
                            done.text[text_sent:],
                            len(done.token_ids) - tokens_sent,
                            reason if result.finished else None,
                        )
                    )
                    text_sent, tokens_sent = len(done.text), len(done.token_ids)
            except BaseException as exc:  # CancelledError included: the reader is told
                out.put(exc)
                raise
            finally:
                out.put(_END)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise BackendError(f"vLLM backend {self.id}: {item}") from item
                yield item
        finally:
            future.cancel()  # cancelling the generate() iteration aborts the request in vLLM

    def _release(self) -> None:
        shutdown = getattr(self._engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


async def _maybe_await(value: Any) -> Any:
    """vLLM versions differ on whether these getters are coroutines."""
    return await value if inspect.isawaitable(value) else value
