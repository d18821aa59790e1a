"""``bench serve``: a model converted to GGUF and quantized, its prompt and decode speeds in
llama.cpp and in transformers, set against the memory-bandwidth bound of decoding."""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from corpusfactory.settings import load_settings
from corpusfactory.tools.bench_machine import cores, machine, memory_bandwidth_gbs

# The prompt of ``bench serve``, repeated to the number of tokens asked for.
SERVE_PROMPT = (
    "La cucina italiana cambia da una regione all'altra: al nord si usano il burro e il "
    "riso, al sud l'olio d'oliva, il pomodoro e la pasta secca. Ogni città ha i suoi "
    "piatti, e ogni famiglia la sua ricetta, che passa di generazione in generazione. "
)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (a small fraction never rounds to 0)."""
    return float(f"{x:.{digits}g}")


def gguf_weight_bytes(path: str | Path) -> tuple[int, int]:
    """(tensor data bytes of a GGUF file, of them the bytes a decode step reads).

    A decode step reads every weight once, except an input embedding table that is not
    also the output layer: of that it reads one row.
    """
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        return total, total - sizes.get("token_embd.weight", 0)
    return total, total


def _serve_figures(
    prompt_s: float,
    decode_s: float,
    n_prompt: int,
    n_decode: int,
    bytes_: int,
    bandwidth_gbs: float,
) -> dict[str, Any]:
    decode_rate = n_decode / decode_s
    bound = bandwidth_gbs * 1e9 / bytes_
    return {
        "prompt_tokens_per_s": _sig(n_prompt / prompt_s),
        "decode_tokens_per_s": _sig(decode_rate),
        "weight_bytes_per_token": bytes_,
        "bound_decode_tokens_per_s": _sig(bound),
        "fraction_of_bound": _sig(decode_rate / bound),
    }


def _llamacpp_speeds(
    path: Path, ids: list[int], n_decode: int, repeats: int, threads: int
) -> tuple[float, float]:
    """(best prompt seconds, best decode seconds) of a GGUF build in llama.cpp."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(ids) + n_decode + 8,
        n_batch=max(len(ids), 8),
        n_ubatch=max(len(ids), 8),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    try:
        llm.eval(ids)  # warm-up: the graphs of both shapes are built before timing
        llm.eval([greedy()])
        prompt_s = decode_s = math.inf
        for _ in range(repeats):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            prompt_s = min(prompt_s, time.perf_counter() - t)
        for _ in range(repeats):
            llm.reset()
            llm.eval(ids)
            token = greedy()
            t = time.perf_counter()
            for _ in range(n_decode):
                llm.eval([token])
                token = greedy()
            decode_s = min(decode_s, time.perf_counter() - t)
    finally:
        llm.close()
    return prompt_s, decode_s


def _transformers_speeds(
    model_dir: str, ids: list[int], n_decode: int, repeats: int
) -> tuple[float, float, int, int]:
    """(best prompt s, best decode s, weight bytes per token, parameters): float32, CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = list(model.parameters())  # a tied embedding is one parameter, counted once
    n_params = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embed:  # untied: one row read per token
        weight_bytes -= embed.numel() * embed.element_size()
    x = torch.tensor([ids])
    prompt_s = decode_s = math.inf
    with torch.inference_mode():
        out = model(x, use_cache=True, logits_to_keep=1)  # warm-up, both shapes
        model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x, use_cache=True, logits_to_keep=1)
            prompt_s = min(prompt_s, time.perf_counter() - t)
        for _ in range(repeats):
            out = model(x, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(n_decode):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            decode_s = min(decode_s, time.perf_counter() - t)
    return prompt_s, decode_s, weight_bytes, n_params


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from corpusfactory.engines.models.registry import resolve_model
    from corpusfactory.errors import ModelError
    from serving.gguf.convert import convert_hf_to_gguf
    from serving.gguf.quantize import quant_ftype, quantize

    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    for q in quants:
        try:
            quant_ftype(q)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
    n_prompt, n_decode, repeats = args.prompt_tokens, args.decode_tokens, args.repeats
    if min(n_prompt, n_decode, repeats) < 1:
        raise ModelError("--prompt-tokens, --decode-tokens and --repeats must be at least 1")
    s = load_settings(args.config)
    model_dir = resolve_model(args.model, s.models.models_dir)
    threads = cores()

    tok = AutoTokenizer.from_pretrained(model_dir)
    text_ids = list(tok(SERVE_PROMPT, add_special_tokens=False)["input_ids"])
    ids = (text_ids * (n_prompt // len(text_ids) + 1))[:n_prompt]

    bandwidth = memory_bandwidth_gbs()
    builds: dict[str, dict[str, Any]] = {}
    prompt_s, decode_s, weight_bytes, n_params = _transformers_speeds(
        model_dir, ids, n_decode, repeats
    )
    builds["transformers F32"] = {
        "engine": "transformers",
        "precision": "F32",
        **_serve_figures(prompt_s, decode_s, n_prompt, n_decode, weight_bytes, bandwidth),
    }
    with tempfile.TemporaryDirectory(prefix="cf-bench-serve-") as tmp:
        f16 = Path(tmp) / "model-F16.gguf"
        started = time.perf_counter()
        convert_hf_to_gguf(model_dir, f16, "f16")
        built_s = {"F16": time.perf_counter() - started}
        for q in quants:
            path = f16 if q == "F16" else Path(tmp) / f"model-{q}.gguf"
            if q != "F16":
                built_s[q] = float(quantize(f16, path, q, threads=threads)["seconds"])
            data_bytes, per_token = gguf_weight_bytes(path)
            prompt_s, decode_s = _llamacpp_speeds(path, ids, n_decode, repeats, threads)
            builds[f"llama.cpp {q}"] = {
                "engine": "llama.cpp",
                "precision": q,
                "file_bytes": path.stat().st_size,
                "tensor_data_bytes": data_bytes,
                "build_s": _sig(max(built_s[q], 1e-6)),
                **_serve_figures(prompt_s, decode_s, n_prompt, n_decode, per_token, bandwidth),
            }
    return {
        "benchmark": "serve",
        "model": args.model,
        "model_dir": str(model_dir),
        "parameters": n_params,
        "prompt_tokens": n_prompt,
        "decode_tokens": n_decode,
        "repeats": repeats,
        "n_threads": threads,
        "memory_bandwidth_gb_s": _sig(bandwidth),
        "builds": builds,
        "machine": machine(),
        "note": "prompt: one evaluation of the whole prompt, logits of its last token only; "
        "decode: greedy steps of one token after that prompt (its cache included), best of "
        "the repeats; bound_decode_tokens_per_s = memory_bandwidth / weight_bytes_per_token "
        "(a step reads each weight once; the KV cache is not counted). A model whose weights "
        "fit in the CPU caches is not bandwidth-bound: its fraction says so",
    }
