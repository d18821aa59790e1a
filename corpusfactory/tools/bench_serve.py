"""``bench serve``: llama.cpp's prompt and decode speeds set against the memory-bandwidth
bound of decoding, on builds made here or on a GGUF file as it is.

Two modes:

* convert (default, ``--model``): a Hugging Face model directory (default the demo
  generator) converted to an F16 GGUF and quantized (``--quants``) in a temporary
  directory, each build measured, next to the transformers float32 baseline on CPU;
* GGUF (``--gguf``): one GGUF file measured as it is, no conversion, no quantization
  and no transformers baseline. ``--gguf`` takes a ``.gguf`` path or a model name,
  resolved with ``resolve_model(name, form="gguf")`` (``gemma3-270m``: Gemma 3 270M
  Q4_K_M, the demo profile's real model).

For each llama.cpp build: prompt tokens/s (one evaluation of a prompt of N tokens) and
greedy decode tokens/s (one sequence, one token per step), with llama-cpp-python directly
(no HTTP), best of the repeats; then *batched* decode (``--decode-batches``, e.g.
``1,4,8``): B sequences decoded together through the producer's own generator
(``producers.generators.llamacpp.LlamaCppGenerator.generate``, greedy, no stop strings),
so the aggregate tokens/s is what the producer gets.

The bound: a decode step reads every weight once (``gguf_weight_bytes``; the KV cache is
not counted), so one sequence decodes at most ``read bandwidth / weight bytes per token``
tokens/s, and a batched step, whose one read of the weights serves B tokens, at most B
times that (until it is compute-bound). The read bandwidth is measured here with a
streaming sum over a buffer far larger than the caches, on the same number of threads
llama.cpp runs on (``--threads``, default this process's cores); the copy bandwidth
(read + write) is measured and reported too, labelled as such, with its bound.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from corpusfactory.settings import load_settings
from corpusfactory.tools.bench_machine import (
    cores,
    machine,
    memory_bandwidth_gbs,
    memory_read_bandwidth_gbs,
)

# The prompt of ``bench serve``, repeated to the number of tokens asked for.
SERVE_PROMPT = (
    "La cucina italiana cambia da una regione all'altra: al nord si usano il burro e il "
    "riso, al sud l'olio d'oliva, il pomodoro e la pasta secca. Ogni città ha i suoi "
    "piatti, e ogni famiglia la sua ricetta, che passa di generazione in generazione. "
)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (a small fraction never rounds to 0)."""
    return float(f"{x:.{digits}g}")


# GGUF metadata value types: the struct format of the fixed-size ones (8: string, 9: array).
_GGUF_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip


def gguf_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """(the scalar metadata of a GGUF file, ``{tensor name: (elements, data bytes)}``).

    Reads the header alone, skipping arrays (a 262k-token vocabulary) without decoding
    them: ``gguf.GGUFReader`` builds every field and takes tens of seconds on such a
    file. A little-endian GGUF of version 2 or 3 (what llama.cpp writes).
    """
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from corpusfactory.errors import ModelError

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        at = 0

        def take(fmt: str) -> Any:
            nonlocal at
            (value,) = struct.unpack_from(fmt, m, at)
            at += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal at
            n = take("<Q")
            at += n
            return bytes(m[at - n : at]).decode("utf-8", "replace")

        def skip_array() -> None:
            nonlocal at
            kind, count = take("<I"), take("<Q")
            if kind in _GGUF_SCALARS:
                at += count * struct.calcsize(_GGUF_SCALARS[kind])
            elif kind == 8:
                for _ in range(count):
                    at += 8 + int.from_bytes(m[at : at + 8], "little")
            elif kind == 9:
                for _ in range(count):
                    skip_array()
            else:
                raise ModelError(f"{path}: unknown GGUF value type {kind}")

        if m[:4] != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file")
        at = 4
        version = take("<I")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version}: not a little-endian v2 or v3")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = string(), take("<I")
            if kind in _GGUF_SCALARS:
                meta[key] = take(_GGUF_SCALARS[kind])
            elif kind == 8:
                meta[key] = string()
            elif kind == 9:
                skip_array()
            else:
                raise ModelError(f"{path}: unknown GGUF value type {kind}")
        tensors: dict[str, tuple[int, int]] = {}
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(take("<I"))]
            take("<Q")  # the data's offset
            n = math.prod(dims)
            tensors[name] = (n, n * type_bytes // block)
    return meta, tensors


def gguf_weight_bytes(path: str | Path) -> tuple[int, int]:
    """(tensor data bytes of a GGUF file, of them the bytes a decode step reads).

    A decode step reads every weight once, except an input embedding table that is not
    also the output layer: of that it reads one row.
    """
    sizes = {name: n_bytes for name, (_, n_bytes) in gguf_tensors(path)[1].items()}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        return total, total - sizes.get("token_embd.weight", 0)
    return total, total


def gguf_info(path: str | Path) -> tuple[str, int]:
    """(the precision of a GGUF file, e.g. ``Q4_K_M``, from its ``general.file_type``;
    its parameters, the elements of its tensors)."""
    import gguf

    meta, tensors = gguf_tensors(path)
    n_params = sum(n for n, _ in tensors.values())
    value = meta.get("general.file_type")
    if not isinstance(value, int):
        return "unknown", n_params
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return f"file_type {value}", n_params
    return name.removeprefix("MOSTLY_"), n_params


def parse_batches(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]`` (empty: no batched decode); each at least 1."""
    from corpusfactory.errors import ModelError

    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError as exc:
        raise ModelError(f"--decode-batches {text!r}: not comma-separated integers") from exc
    if any(b < 1 for b in batches):
        raise ModelError(f"--decode-batches {text!r}: each batch must be at least 1")
    return list(dict.fromkeys(batches))


def _bounds(bytes_: int, read_gbs: float, copy_gbs: float) -> tuple[float, float]:
    """(read bound, copy bound) of one sequence's decode, tokens/s."""
    return read_gbs * 1e9 / bytes_, copy_gbs * 1e9 / bytes_


def _serve_figures(
    prompt_s: float,
    decode_s: float,
    n_prompt: int,
    n_decode: int,
    bytes_: int,
    read_gbs: float,
    copy_gbs: float,
) -> dict[str, Any]:
    decode_rate = n_decode / decode_s
    read_bound, copy_bound = _bounds(bytes_, read_gbs, copy_gbs)
    return {
        "prompt_tokens_per_s": _sig(n_prompt / prompt_s),
        "decode_tokens_per_s": _sig(decode_rate),
        "weight_bytes_per_token": bytes_,
        "read_bound_tokens_per_s": _sig(read_bound),
        "fraction_of_bound": _sig(decode_rate / read_bound),
        "copy_bound_tokens_per_s": _sig(copy_bound),
        "fraction_of_copy_bound": _sig(decode_rate / copy_bound),
    }


def _repeat_to(ids: list[int], n: int) -> list[int]:
    """``ids`` repeated, cut to ``n`` tokens."""
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def _llamacpp_speeds(
    path: Path, ids: list[int] | None, n_prompt: int, n_decode: int, repeats: int, threads: int
) -> tuple[float, float]:
    """(best prompt seconds, best decode seconds) of a GGUF build in llama.cpp. ``ids``:
    the prompt; ``None``: ``SERVE_PROMPT`` in the file's own tokens, ``n_prompt`` of them."""
    import llama_cpp
    import numpy as np

    if ids is None:
        vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            text_ids = vocab.tokenize(SERVE_PROMPT.encode("utf-8"), add_bos=False)
        finally:
            vocab.close()
        ids = _repeat_to(list(text_ids), n_prompt)
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


def _prompt_text(tokenize: Any, n: int) -> str:
    """The first words of ``SERVE_PROMPT`` (repeated) that make at least ``n`` tokens."""
    words = SERVE_PROMPT.split()
    text = ""
    i = 0
    while len(tokenize(text)) < n:
        text = f"{text} {words[i % len(words)]}".lstrip()
        i += 1
    return text


def _batched_decode(
    path: Path,
    n_prompt: int,
    n_decode: int,
    batches: list[int],
    repeats: int,
    threads: int,
    bytes_: int,
    read_gbs: float,
) -> dict[str, dict[str, Any]]:
    """Aggregate greedy decode tokens/s of B sequences decoded together by the producer's
    llama.cpp generator, for each B of ``batches``, against B times the read bound.

    Each call of ``generate`` prefills the prompts (after the warm-up call they are in the
    KV cache but for their last token, which the generator decodes again) then decodes. A
    call with ``max_new_tokens=1`` does only the prefill and the first token, so the
    decode steps take the difference of the best times of the two calls, and make the
    difference of their generated tokens (``n_decode - 1`` per sequence, fewer if one
    ends at an end-of-generation token).
    """
    from corpusfactory.errors import ModelError
    from corpusfactory.settings import GenerationSettings
    from producers.generators.llamacpp import LlamaCppGenerator

    read_bound = read_gbs * 1e9 / bytes_
    full = GenerationSettings(temperature=0.0, max_new_tokens=n_decode)
    first = GenerationSettings(temperature=0.0, max_new_tokens=1)
    out: dict[str, dict[str, Any]] = {}
    for b in batches:
        gen = LlamaCppGenerator(str(path), threads=threads, n_ctx=n_prompt + n_decode + 16, batch=b)
        try:
            text = _prompt_text(gen.tokenize, n_prompt)
            # Each sequence its own prompt: a number in front of the same text.
            prompts = [f"{i + 1}. {text}" for i in range(b)]
            prompt_len = len(gen.tokenize(prompts[0]))

            def timed(params: GenerationSettings, gen: Any = gen, prompts: Any = prompts) -> Any:
                before = gen.stats["generated_tokens"]
                t = time.perf_counter()
                gen.generate(prompts, params, [])
                return time.perf_counter() - t, gen.stats["generated_tokens"] - before

            timed(full)  # warm-up: the graphs are built, the prompts cached
            full_s = first_s = math.inf
            full_tokens = first_tokens = 0
            for _ in range(repeats):
                seconds, full_tokens = timed(full)
                full_s = min(full_s, seconds)
                seconds, first_tokens = timed(first)
                first_s = min(first_s, seconds)
        finally:
            gen.close()
        tokens = full_tokens - first_tokens
        decode_s = full_s - first_s
        if tokens < 1 or decode_s <= 0:
            raise ModelError(
                f"bench serve: batched decode of {b} sequences measured no decode steps "
                f"({tokens} tokens in {decode_s:.3g} s): raise --decode-tokens"
            )
        rate = tokens / decode_s
        out[str(b)] = {
            "sequences": b,
            "prompt_tokens_per_sequence": prompt_len,
            "decoded_tokens": tokens,
            "decode_s": _sig(decode_s),
            "decode_tokens_per_s": _sig(rate),
            "bound_tokens_per_s": _sig(b * read_bound),
            "fraction_of_bound": _sig(rate / (b * read_bound)),
        }
    return out


def _gguf_path(name: str, models_dir: Path | str | None) -> Path:
    """``--gguf``'s file: a ``.gguf`` path as it is, a model name resolved as a GGUF."""
    from corpusfactory.engines.models.registry import resolve_model
    from corpusfactory.errors import ModelError

    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf" and not path.is_file():
        path = Path(resolve_model(name, models_dir, form="gguf"))
    if not path.is_file():
        raise ModelError(f"bench serve --gguf: {path} is not a file")
    return path


def _llamacpp_build(
    path: Path,
    ids: list[int] | None,
    args: argparse.Namespace,
    threads: int,
    batches: list[int],
    read_gbs: float,
    copy_gbs: float,
) -> dict[str, Any]:
    """The figures of one GGUF file (no build time: the caller adds it)."""
    n_prompt, n_decode, repeats = args.prompt_tokens, args.decode_tokens, args.repeats
    data_bytes, per_token = gguf_weight_bytes(path)
    precision, _ = gguf_info(path)
    prompt_s, decode_s = _llamacpp_speeds(path, ids, n_prompt, n_decode, repeats, threads)
    build: dict[str, Any] = {
        "engine": "llama.cpp",
        "precision": precision,
        "file_bytes": path.stat().st_size,
        "tensor_data_bytes": data_bytes,
        **_serve_figures(prompt_s, decode_s, n_prompt, n_decode, per_token, read_gbs, copy_gbs),
    }
    if batches:
        build["batched_decode"] = _batched_decode(
            path, n_prompt, n_decode, batches, repeats, threads, per_token, read_gbs
        )
    return build


NOTE = (
    "prompt: one evaluation of the whole prompt, logits of its last token only; decode: "
    "greedy steps of one token after that prompt (its cache included), best of the repeats; "
    "read_bound_tokens_per_s = read bandwidth / weight_bytes_per_token (a step reads each "
    "weight once; the KV cache is not counted), fraction_of_bound = decode_tokens_per_s / "
    "read_bound_tokens_per_s; copy_bound_*: the same with the copy (read + write) "
    "bandwidth. batched_decode[B]: B sequences decoded together by the producer's llama.cpp "
    "generator, aggregate tokens/s of the decode steps, against B x the read bound (one "
    "read of the weights serves B tokens, until compute-bound). A model whose weights fit "
    "in the CPU caches is not bandwidth-bound: its fraction says so"
)


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from corpusfactory.errors import ModelError
    from serving.gguf.quantize import quant_ftype

    gguf_name: str | None = getattr(args, "gguf", None)
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    if gguf_name is None:
        for q in quants:
            try:
                quant_ftype(q)
            except ValueError as exc:
                raise ModelError(str(exc)) from exc
    n_prompt, n_decode, repeats = args.prompt_tokens, args.decode_tokens, args.repeats
    if min(n_prompt, n_decode, repeats) < 1:
        raise ModelError("--prompt-tokens, --decode-tokens and --repeats must be at least 1")
    batches = parse_batches(getattr(args, "decode_batches", "") or "")
    if batches and n_decode < 2:
        raise ModelError("--decode-batches needs --decode-tokens of at least 2")
    threads = getattr(args, "threads", None)
    threads = cores() if threads is None else threads
    if threads < 1:
        raise ModelError("--threads must be at least 1")
    s = load_settings(args.config)

    # Both at llama.cpp's thread count, before any model is loaded.
    read_gbs = memory_read_bandwidth_gbs(threads=threads)
    copy_gbs = memory_bandwidth_gbs(threads=threads)
    head: dict[str, Any] = {"benchmark": "serve"}
    builds: dict[str, dict[str, Any]] = {}
    if gguf_name is not None:
        path = _gguf_path(gguf_name, s.models.models_dir)
        build = _llamacpp_build(path, None, args, threads, batches, read_gbs, copy_gbs)
        builds[f"llama.cpp {build['precision']}"] = build
        head |= {
            "mode": "gguf",
            "model": gguf_name,
            "gguf": str(path),
            "parameters": gguf_info(path)[1],
        }
    else:
        head |= _convert_builds(
            args, s.models.models_dir, quants, threads, batches, read_gbs, copy_gbs, builds
        )
    return {
        **head,
        "prompt_tokens": n_prompt,
        "decode_tokens": n_decode,
        "repeats": repeats,
        "decode_batches": batches,
        "n_threads": threads,
        "read_bandwidth_gb_s": _sig(read_gbs),
        "copy_bandwidth_gb_s": _sig(copy_gbs),
        "builds": builds,
        "machine": machine(),
        "note": NOTE,
    }


def _convert_builds(
    args: argparse.Namespace,
    models_dir: Path | str | None,
    quants: list[str],
    threads: int,
    batches: list[int],
    read_gbs: float,
    copy_gbs: float,
    builds: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Convert mode: the transformers baseline, then each GGUF build, into ``builds``;
    returns the head of the result (the model and its parameters)."""
    from transformers import AutoTokenizer

    from corpusfactory.engines.models.registry import resolve_model
    from serving.gguf.convert import convert_hf_to_gguf
    from serving.gguf.quantize import quantize

    n_prompt, n_decode, repeats = args.prompt_tokens, args.decode_tokens, args.repeats
    model_dir = resolve_model(args.model, models_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = _repeat_to(list(tok(SERVE_PROMPT, add_special_tokens=False)["input_ids"]), n_prompt)

    prompt_s, decode_s, weight_bytes, n_params = _transformers_speeds(
        model_dir, ids, n_decode, repeats
    )
    builds["transformers F32"] = {
        "engine": "transformers",
        "precision": "F32",
        **_serve_figures(prompt_s, decode_s, n_prompt, n_decode, weight_bytes, read_gbs, copy_gbs),
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
            build = _llamacpp_build(path, ids, args, threads, batches, read_gbs, copy_gbs)
            build["precision"] = q  # the name asked for (the file's own type may differ)
            build["build_s"] = _sig(max(built_s[q], 1e-6))
            builds[f"llama.cpp {q}"] = build
    return {
        "mode": "convert",
        "model": args.model,
        "model_dir": str(model_dir),
        "parameters": n_params,
    }
