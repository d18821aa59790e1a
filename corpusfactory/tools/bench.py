"""``corpusfactory bench``: measured figures, printed (and optionally saved) as JSON.

* ``bench scorer``: the MLM NLL scorer in each precision against the measured peak of
  that precision, and against the plain ways of scoring
  (:mod:`corpusfactory.tools.bench_scorer`).
* ``bench pipeline``: each stage alone, then the whole stack, and the pipeline's
  efficiency against its slowest stage (:mod:`corpusfactory.tools.bench_pipeline`).

* ``bench train``: a fine-tuning run through the trainer's own path (``training.fit``
  under DeepSpeed, the configured ZeRO stage) on the seed conversations: tokens/s of
  the training loop, and MFU, the model FLOPs achieved (6 N per token plus
  12 L d T for attention, N = the parameters that take part in matrix multiplies) over
  this machine's measured matrix-multiply peak in the training precision.

* ``bench serve``: a model (default the demo generator) converted to an F16 GGUF and
  quantized (default F16, Q8_0, Q4_K_M) in a temporary directory, next to the
  transformers full-precision baseline (float32 on CPU); or, with ``--gguf`` (a model
  name resolved as a GGUF, e.g. ``gemma3-270m``, or a ``.gguf`` path), one GGUF file as
  it is. For each llama.cpp build, measured with llama-cpp-python directly (no HTTP):
  prompt processing tokens/s (one evaluation of a prompt of N tokens, best of the
  repeats), greedy decode tokens/s of one sequence, and aggregate decode tokens/s of B
  sequences decoded together by the producer's llama.cpp generator
  (``--decode-batches``). Each is set against the memory-bandwidth bound of decoding,
  ``read bandwidth / weight bytes per token`` (a decode step reads every weight once; B
  times that for B sequences), with this machine's read bandwidth measured here on
  llama.cpp's thread count (``bench_serve``); the copy bandwidth's bound is reported too.

This machine's figures (matrix-multiply peak, memory bandwidth) are measured by
``bench_machine``.

Figures are recorded in ``docs/benchmarks.md`` with the date and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import write_text_atomic
from corpusfactory.errors import UsageError
from corpusfactory.settings import load_settings
from corpusfactory.tools.bench_machine import machine, matmul_peak_gflops
from corpusfactory.tools.bench_serve import bench_serve


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
        "machine": machine(),
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
    from corpusfactory.tools.bench_pipeline import bench_pipeline
    from corpusfactory.tools.bench_scorer import bench_scorer

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
