"""The transformers backend: a local causal language model, in-process.

Prompts are left-padded and generated as one batch. Sampling is reproducible:
each call seeds torch's RNG with a seed derived from ``params.seed`` and a call
counter, inside ``torch.random.fork_rng`` so the process-wide RNG is left as it
was. One call runs at a time (a lock), since the RNG fork is process-wide.

The weights' dtype is ``producer.dtype``: ``auto`` keeps float32 on a CPU unless it
computes bfloat16 natively (AVX512-BF16 or AMX flags) and the model was saved in
bfloat16 (Gemma); elsewhere it is the saved dtype. On a CPU without those
instructions bfloat16 matrix multiplies are converted, not faster (see
``docs/benchmarks.md``), so ``bfloat16`` there only halves the memory.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from corpusfactory.engines.causal_lm import load_causal_lm
from corpusfactory.engines.hardware import cpu_has_native_bf16
from corpusfactory.errors import GeneratorError
from corpusfactory.settings import GenerationSettings
from corpusfactory.text import cut_at_stop
from producers.generators.base import derive_seed

DTYPES = ("auto", "float32", "bfloat16")


def saved_dtype(path: Path) -> str | None:
    """The dtype a model directory's config.json says its weights were saved in."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None


def choose_dtype(dtype: str, device_type: str, saved: str | None, native_bf16: bool) -> str:
    """The dtype to load with: ``float32``, ``bfloat16`` or ``auto`` (the saved one)."""
    if dtype not in DTYPES:
        raise GeneratorError(f"transformers generator: unknown dtype {dtype!r}; use {DTYPES}")
    if dtype != "auto":
        return dtype
    if device_type != "cpu":
        return "auto"
    return "bfloat16" if saved == "bfloat16" and native_bf16 else "float32"


class HFGenerator:
    """A transformers ``AutoModelForCausalLM`` loaded from a local directory."""

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        *,
        use_stop_criteria: bool = True,
        dtype: str = "auto",
    ):
        import torch

        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise GeneratorError(
                f"transformers generator: model directory {path} does not exist "
                "(the generator backend 'transformers' loads local models only)"
            )
        try:
            self._device = torch.device(device)
        except RuntimeError as exc:
            raise GeneratorError(f"transformers generator: bad device {device!r}: {exc}") from None
        model: Any
        chosen = choose_dtype(
            dtype,
            self._device.type,
            saved_dtype(path),
            self._device.type == "cpu" and cpu_has_native_bf16(),
        )
        self.dtype = chosen
        tok, model = load_causal_lm(
            path,
            device=self._device,
            dtype=chosen,
            what="transformers generator",
            error=GeneratorError,
        )
        tok.padding_side = "left"
        tok.truncation_side = "left"  # keep the end of an over-long prompt
        if tok.pad_token_id is None:  # no pad and no eos token to stand in for it
            raise GeneratorError(
                f"transformers generator: the tokenizer of {path} has neither a pad "
                "nor an eos token"
            )
        self._tok = tok
        self._model = model
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._use_stop_criteria = use_stop_criteria
        self._calls = 0
        self._lock = threading.Lock()
        self._closed = False
        self.id = f"transformers:{path.name}"

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        if self._closed:
            raise GeneratorError("transformers generator: generate() after close()")
        if not prompts:
            return []
        import torch

        with self._lock:
            call = self._calls
            self._calls += 1
            enc_kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
            if self._max_positions:
                budget = self._max_positions - params.max_new_tokens
                if budget < 1:
                    raise GeneratorError(
                        f"transformers generator: max_new_tokens={params.max_new_tokens} "
                        f"leaves no room for a prompt (the model has {self._max_positions} "
                        "positions)"
                    )
                enc_kwargs.update(truncation=True, max_length=budget)
            enc = self._tok(prompts, **enc_kwargs).to(self._device)
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": params.max_new_tokens,
                "pad_token_id": self._tok.pad_token_id,
                "eos_token_id": self._tok.eos_token_id,
            }
            if params.temperature > 0:
                # top_k=0 disables transformers' default top-k of 50: nucleus sampling
                # only, as the openai and vllm backends do.
                gen_kwargs.update(
                    do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0
                )
            else:
                # Greedy. Neutral sampling values, so a model's own generation_config
                # (e.g. temperature 0.6) does not produce "unused flag" noise.
                gen_kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=None)
            stops = [s for s in stop if s]
            if self._use_stop_criteria and stops:
                # Ends each row early once it produced a stop string; we cut below anyway.
                gen_kwargs.update(stop_strings=stops, tokenizer=self._tok)
            devices = [self._device.index or 0] if self._device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices), torch.inference_mode():
                    torch.manual_seed(derive_seed(params.seed, call))
                    out = self._model.generate(
                        input_ids=enc["input_ids"],
                        attention_mask=enc["attention_mask"],
                        **gen_kwargs,
                    )
            except (RuntimeError, ValueError) as exc:
                raise GeneratorError(f"transformers generator failed: {exc}") from exc
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts = self._tok.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop(t, stops) for t in texts]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        is_cuda = self._device.type == "cuda"
        del self._model
        if is_cuda:
            import torch

            torch.cuda.empty_cache()
