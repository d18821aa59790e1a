"""``corpusfactory bench``: measured figures, printed (and optionally saved) as JSON.

* ``bench scorer``: messages/s of the MLM NLL scorer on the seed messages, its
  achieved GFLOP/s (useful FLOPs, see ``scoring.nll.flops_per_masked_copy``),
  next to this machine's measured float32 matrix-multiply peak.
* ``bench pipeline``: the whole stack (embedded broker unless
  ``KAFKA_BOOTSTRAP_SERVERS``, one scorer, one admitter, the producer) on a fresh
  state directory: decided turns/s end to end; per decided turn, the seconds
  spent generating, embedding, scoring, admitting, and the rest of its round
  trip (Kafka transport, batching windows, queueing); and each stage's share of
  the summed busy time.

* ``bench train``: a fine-tuning run through the trainer's own path (``training.fit``
  under DeepSpeed, the configured ZeRO stage) on the seed conversations: tokens/s of
  the training loop, and MFU, the model FLOPs achieved (6 N per token plus
  12 L d T for attention, N = the parameters that take part in matrix multiplies) over
  this machine's measured matrix-multiply peak in the training precision.

* ``bench serve``: a model (default the demo generator) converted to an F16 GGUF and
  quantized (default F16, Q8_0, Q4_K_M) in a temporary directory; for each build,
  measured with llama-cpp-python directly (no HTTP): prompt processing tokens/s (one
  evaluation of a prompt of N tokens, best of the repeats) and greedy decode tokens/s
  (one token per step after that prompt, all the machine's cores), next to the
  transformers full-precision baseline (float32 on CPU). Each is set against the
  memory-bandwidth bound of decoding, ``bandwidth / weight bytes per token`` (a decode
  step reads every weight once), with this machine's copy bandwidth measured here.

Figures are recorded in ``docs/benchmarks.md`` with the date and the command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import write_text_atomic
from corpusfactory.errors import UsageError
from corpusfactory.settings import load_settings


def matmul_peak_gflops(
    n: int = 2048, reps: int = 10, device: str = "cpu", dtype: str = "float32"
) -> float:
    """Best-of GEMM throughput with torch (CPU threads, or a GPU), in GFLOP/s."""
    import torch

    dt_ = getattr(torch, dtype)
    if device != "cpu":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device, dtype=dt_)
    b = torch.randn(n, n, device=device, dtype=dt_)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = max(best, 2.0 * n**3 / dt / 1e9)
    return best


def _machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def bench_scorer(args: argparse.Namespace) -> dict[str, Any]:
    from corpusfactory.engines.models.registry import resolve_model
    from corpusfactory.engines.scoring.nll import MLMScorer
    from corpusfactory.seeds import load_seeds

    s = load_settings(args.config)
    scorer = MLMScorer(
        resolve_model(s.models.scorer, s.models.models_dir),
        device=s.models.device,
        max_tokens=s.admission.max_tokens,
        masked_batch_size=s.admission.masked_batch_size,
        granularity=s.admission.nll_granularity,
    )
    texts = [m.text for c in load_seeds(s.producer.seed_file) for m in c.messages]
    texts = (texts * (args.messages // len(texts) + 1))[: args.messages]
    scorer.score(texts[:8])  # warm-up
    t = time.perf_counter()
    results = scorer.score(texts)
    dt = time.perf_counter() - t
    tokens = [r.tokens for r in results]
    flops = scorer.estimate_flops(tokens)
    peak = matmul_peak_gflops()
    achieved = flops / dt / 1e9
    return {
        "benchmark": "scorer",
        "model": scorer.id,
        "messages": len(texts),
        "mean_tokens": sum(tokens) / len(tokens),
        "masked_batch_size": s.admission.masked_batch_size,
        "seconds": round(dt, 3),
        "messages_per_s": round(len(texts) / dt, 2),
        "scored_tokens_per_s": round(sum(tokens) / dt, 1),
        "achieved_gflops": round(achieved, 2),
        "matmul_peak_gflops": round(peak, 2),
        "fraction_of_peak": round(achieved / peak, 4),
        "machine": _machine(),
    }


def bench_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from corpusfactory.engines.broker import EmbeddedBroker
    from corpusfactory.tools.demo import run_pipeline

    with tempfile.TemporaryDirectory(prefix="cf-bench-") as tmp:
        s = load_settings(args.config, overrides={"state_dir": tmp})
        broker = None
        if not s.kafka.bootstrap_servers:
            broker = EmbeddedBroker(Path(tmp))
            broker.start()
        try:
            result = run_pipeline(s, args.conversations)
        finally:
            if broker is not None:
                broker.stop()
    p = result["producer"]
    wall = p["wall_s"]
    decided = sum(p["decisions"].values())
    n = max(decided, 1)
    busy = {"generate": p["generate_s"], **p["stage_s"]}
    per_turn = {k: v / n for k, v in busy.items()}
    # what a turn's round trip spent outside the worker stages: Kafka transport,
    # batching windows, queueing behind other turns
    roundtrip = p["roundtrip_s"] / n
    per_turn["kafka_and_queueing"] = max(
        0.0, roundtrip - sum(per_turn.get(k, 0.0) for k in ("embed", "score", "admit"))
    )
    total_busy = sum(busy.values())
    return {
        "benchmark": "pipeline",
        "conversations": args.conversations,
        "decided_turns": decided,
        "decisions": p["decisions"],
        "wall_s": round(wall, 2),
        "decided_turns_per_s": round(decided / wall, 3),
        "per_turn_s": {k: round(v, 4) for k, v in per_turn.items()},
        "busy_seconds": {k: round(v, 3) for k, v in busy.items()},
        "busy_share": {k: round(v / total_busy, 4) for k, v in busy.items()},
        "mean_roundtrip_s": round(roundtrip, 3),
        "startup_s": result["timing_s"],
        "machine": _machine(),
        "note": "producer, scorer and admitter are separate processes sharing the cores: "
        "stage times overlap, so busy_share is a share of the summed busy time, not of wall",
    }


def train_flops_per_token(config: Any, n_params: int, seq_len: int) -> float:
    """6 N + 12 L d T: matmul parameters (input embeddings excluded unless tied to the
    output layer, whose matmul they then are) plus attention scores and values."""
    d = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    matmul_params = n_params
    if not getattr(config, "tie_word_embeddings", False):
        matmul_params -= int(config.vocab_size) * d
    return 6.0 * matmul_params + 12.0 * layers * d * seq_len


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig

    from corpusfactory.chatformat import ChatFormat
    from corpusfactory.engines.models.registry import resolve_model
    from corpusfactory.seeds import load_seeds
    from training import dsconfig
    from training.data import TrainingConversation
    from training.launch import run_fit, write_job

    over: dict[str, Any] = {"max_steps": args.steps, "epochs": 1000.0, "warmup_steps": 1}
    if args.seq_len:
        over["seq_len"] = args.seq_len
    if args.micro_batch:
        over["micro_batch_size"] = args.micro_batch
    s = load_settings(args.config, overrides={"training": over})
    t = s.training
    model = resolve_model(t.base_model, s.models.models_dir)
    ds = dsconfig.resolve(dsconfig.load(t.deepspeed_config), t)
    convs = [
        TrainingConversation(c.id, "seed", c.messages)
        for c in load_seeds(s.producer.seed_file, s.producer.seed_format)
    ]
    with tempfile.TemporaryDirectory(prefix="cf-bench-train-") as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        job = Path(tmp) / "job"
        fmt = ChatFormat(s.producer.user_tag, s.producer.assistant_tag)
        write_job(job, "snap-00000-19700101T000000Z", model, staging, convs, t, ds, fmt)
        started = time.perf_counter()
        stats = run_fit([sys.executable, "-m", "training.fit", str(job)], job, staging)
        wall = time.perf_counter() - started
    config = AutoConfig.from_pretrained(model)
    per_token = train_flops_per_token(config, int(stats["parameters"]), t.seq_len)
    device = "cuda" if t.device.startswith("cuda") else "cpu"
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[t.precision]
    peak = matmul_peak_gflops(device=device, dtype=dtype) * 1e9 * int(stats["world_size"])
    achieved = float(stats["tokens_per_s"]) * per_token
    return {
        "benchmark": "train",
        "model": t.base_model,
        "parameters": stats["parameters"],
        "deepspeed_config": t.deepspeed_config,
        "zero_stage": stats["zero_stage"],
        "precision": t.precision,
        "seq_len": t.seq_len,
        "micro_batch_size": t.micro_batch_size,
        "steps": stats["steps"],
        "tokens": stats["tokens"],
        "tokens_per_s": stats["tokens_per_s"],
        "train_loop_s": stats["train_seconds"],
        "wall_s_with_startup": round(wall, 2),
        "flops_per_token": per_token,
        "achieved_gflops": round(achieved / 1e9, 2),
        "peak_gflops": round(peak / 1e9, 2),
        "mfu": round(achieved / peak, 4),
        "loss": [stats["first_loss"], stats["final_loss"]],
        "world_size": stats["world_size"],
        "machine": _machine(),
    }


# -- serve --------------------------------------------------------------------------

# The prompt of ``bench serve``, repeated to the number of tokens asked for.
SERVE_PROMPT = (
    "La cucina italiana cambia da una regione all'altra: al nord si usano il burro e il "
    "riso, al sud l'olio d'oliva, il pomodoro e la pasta secca. Ogni città ha i suoi "
    "piatti, e ogni famiglia la sua ricetta, che passa di generazione in generazione. "
)


def _cores() -> int:
    """The CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (a small fraction never rounds to 0)."""
    return float(f"{x:.{digits}g}")


def memory_bandwidth_gbs(mib: int = 256, reps: int = 10, threads: int | None = None) -> float:
    """This machine's memory bandwidth in GB/s: bytes read plus bytes written per second
    by a copy of a ``mib`` MiB float64 array (far beyond the caches), split into one
    slice per thread (numpy releases the GIL while copying), best of ``reps``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = mib * 2**20 // 8
    src = np.ones(n)
    dst = np.empty(n)  # its pages are first touched by the warm-up, not while timed
    k = threads or _cores()
    edges = [n * i // k for i in range(k + 1)]
    slices = [slice(a, b) for a, b in itertools.pairwise(edges)]

    def copy(part: slice) -> None:
        np.copyto(dst[part], src[part])

    best = math.inf
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(copy, slices))  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(copy, slices))
            best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


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
    threads = _cores()

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
        "machine": _machine(),
        "note": "prompt: one evaluation of the whole prompt, logits of its last token only; "
        "decode: greedy steps of one token after that prompt (its cache included), best of "
        "the repeats; bound_decode_tokens_per_s = memory_bandwidth / weight_bytes_per_token "
        "(a step reads each weight once; the KV cache is not counted). A model whose weights "
        "fit in the CPU caches is not bandwidth-bound: its fraction says so",
    }


def bench_generators(args: argparse.Namespace) -> dict[str, Any]:
    """Turns/s of the generator backends on Gemma 3 270M (``bench_generators.run``)."""
    from corpusfactory.tools import bench_generators

    s = load_settings(args.config)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches {args.batches!r}: give positive sizes, like 1,8")
    unknown = sorted(set(backends) - set(bench_generators.BACKENDS))
    if unknown or not backends:
        raise UsageError(
            f"--backends {args.backends!r}: choose from {', '.join(bench_generators.BACKENDS)}"
        )
    return bench_generators.run(
        s,
        backends=backends,
        batches=batches,
        rounds=args.rounds,
        threads=args.threads,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )


def run_bench(args: argparse.Namespace) -> int:
    fn = {
        "generators": bench_generators,
        "scorer": bench_scorer,
        "pipeline": bench_pipeline,
        "train": bench_train,
        "serve": bench_serve,
    }[args.what]
    result = fn(args)
    result["date"] = time.strftime("%Y-%m-%d")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    return 0
