"""Full-precision serving with transformers: ``model.generate`` in a thread, streamed.

The reference backend: any local Hugging Face causal LM directory, on CPU or one
GPU, no batching. Each request runs ``generate`` in its own thread and reads its
text from a ``TextIteratorStreamer``; a lock lets one generation run at a time,
which keeps a seeded request reproducible (the torch RNG is process-wide) and
keeps CPU threads from fighting. For throughput on a GPU use the vLLM backend.

    backend = TransformersBackend("path/to/model", model_id="snap-42")
    with backend.generate_stream("[|Umano|] Ciao\\n[|Assistente|]", GenerationParams()) as s:
        print("".join(s), s.finish_reason, s.completion_tokens)
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from corpusfactory.engines.causal_lm import load_causal_lm
from serving.backends.base import Backend, BackendError, GenerationParams, Piece


class _CountingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also counts the generated tokens and keeps the last one."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.generated = 0
        self.last_token: int | None = None
        self._ended = False

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first put is the prompt itself
            self.generated += int(value.numel())
            self.last_token = int(value.reshape(-1)[-1])
        super().put(value)

    def end(self) -> None:
        # generate() calls end() when it finishes; we call it again after a failure.
        if not self._ended:
            self._ended = True
            super().end()


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` at the next token once the request is gone."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.full((input_ids.shape[0],), self._event.is_set(), device=input_ids.device)
        return done  # type: ignore[return-value]


class TransformersBackend(Backend):
    """A local ``AutoModelForCausalLM`` directory served in full precision."""

    kind = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_id: str | None = None,
        device: str | None = None,
        n_ctx: int | None = None,
    ) -> None:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise BackendError(f"transformers backend: model directory {path} does not exist")
        super().__init__(model_id or path.name)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._tok, model = load_causal_lm(
            path,
            device=self._device,
            dtype="float32" if self._device.type == "cpu" else "auto",
            what="transformers backend",
            error=BackendError,
        )
        self._model: Any = model
        limits = [getattr(model.config, "max_position_embeddings", None), n_ctx]
        known = [n for n in limits if n]
        if not known:
            raise BackendError(f"transformers backend: {path} states no context length; pass n_ctx")
        self._n_ctx = min(known)
        self._eos = self._tok.eos_token_id
        self._pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self._eos
        self._lock = threading.Lock()
        # A fast tokenizer may reconfigure itself while encoding, which fails ("Already
        # borrowed") when two threads encode at once: requests count tokens in parallel.
        self._tok_lock = threading.Lock()

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self._tok(text)["input_ids"])

    def _generate(self, prompt: str, params: GenerationParams) -> Generator[Piece, None, None]:
        with self._tok_lock:
            enc = self._tok(prompt, return_tensors="pt").to(self._device)
        streamer = _CountingStreamer(self._tok)
        cancel = threading.Event()
        failures: list[BaseException] = []
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self._pad,
            "eos_token_id": self._eos,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
        }
        if params.temperature > 0:
            # top_k=0: nucleus sampling only, as llama.cpp and vLLM are configured here.
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            kwargs.update(top_k=0)
        else:
            # Neutral values, so the model's own generation_config does not leak in.
            kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=None)

        def work() -> None:
            try:
                with self._lock:
                    if cancel.is_set():
                        return
                    if self._model is None:
                        raise BackendError(f"transformers backend {self.id} is closed")
                    devices = [self._device.index or 0] if self._device.type == "cuda" else []
                    with torch.random.fork_rng(devices=devices), torch.inference_mode():
                        if params.seed is not None:
                            torch.manual_seed(params.seed)
                        self._model.generate(**enc, **kwargs)
            except BaseException as exc:  # reported to the reader below, not lost in the thread
                failures.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=work, name=f"generate:{self.id}", daemon=True)
        thread.start()
        reported = 0
        try:
            for text in streamer:
                if text:
                    now = streamer.generated
                    yield Piece(text, tokens=now - reported)
                    reported = now
            thread.join()
            if failures:
                raise BackendError(f"transformers backend {self.id}: {failures[0]}") from failures[
                    0
                ]
            total = streamer.generated
            hit_length = total >= params.max_tokens and streamer.last_token != self._eos
            yield Piece(
                "", tokens=total - reported, finish_reason="length" if hit_length else "stop"
            )
        finally:
            cancel.set()

    def _release(self) -> None:
        # Wait for a generation still running (a cancelled one stops at its next token).
        with self._lock:
            self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
