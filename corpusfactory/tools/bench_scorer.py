"""``corpusfactory bench scorer``: the masked-LM scorer in each precision, against the
machine's measured peak of that precision and against the plain ways of scoring.

For each precision asked (``--precisions``, default ``float32,bfloat16,int8``) the
scorer (``MLMScorer``, the settings' model, or with ``--size base`` a randomly
initialised BERT-base: 12 layers, hidden 768, vocabulary 30,522, enough for timing)
scores the seed messages; reported are messages/s, the achieved GFLOP/s (useful
FLOPs: one masked copy per token, ``scoring.nll.flops_per_masked_copy``), the peak of
that precision measured here (a 2048² matrix product; for int8 the dynamically
quantized linear layer the scorer runs), the fraction of it, the speed-up over float32,
and the NLL differences from float32. Two plain float32 ways of computing the same
NLL, on the first ``--reference`` messages, give the speed-ups of the batched scorer:
one full forward pass per masked copy (``direct_nll``, the definition) and all masked
copies of a text in one batch with full-vocabulary logits (minicons' way).

With the settings' model (not ``--size base``), each precision's NLL threshold is
computed from the seed messages as the scorer worker computes it (the
``admission.nll_threshold_percentile`` of their NLLs, or the fixed
``admission.nll_threshold``), and the texts of ``--texts`` (a ``corpus export`` file,
or the seeds) are decided with it: ``decision_flips`` counts the texts whose
accept/reject on NLL differs from float32's.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from corpusfactory.settings import Settings, load_settings
from corpusfactory.tools.bench_machine import machine, matmul_peak_gflops


def int8_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Best-of throughput of a dynamically quantized int8 linear layer on an n×n input
    (activation quantization included, as the int8 scorer runs it), in GOP/s."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        layer = DynamicLinear(n, n, dtype=torch.qint8)
    x = torch.randn(n, n)
    layer(x)  # warm-up
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        layer(x)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_gflops(precision: str) -> float:
    """The measured peak of ``precision``; a precision this CPU emulates (bfloat16
    without AVX512-BF16/AMX runs at about 1 GFLOP/s here) is measured on a smaller
    product, so that measuring it does not take minutes."""
    if precision == "int8":
        return int8_peak_gflops()
    if precision == "bfloat16":
        from corpusfactory.engines.hardware import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            return matmul_peak_gflops(n=512, reps=3, dtype=precision)
    return matmul_peak_gflops(dtype=precision)


# A precision whose measured peak is below this share of float32's is not used to score
# (it would take hours at BERT-base size); the result says so, with both peaks.
SLOW_PRECISION = 0.5


def random_bert_base(out: Path, tokenizer_from: str) -> Path:
    """A randomly initialised BERT-base MLM (seed 0) saved in ``out`` with the tokenizer
    of ``tokenizer_from`` (its ids must fit the 30,522-entry vocabulary)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    if len(tok) > 30522:
        raise ValueError(f"the tokenizer of {tokenizer_from} has {len(tok)} entries (> 30,522)")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id or 0,
    )
    BertForMaskedLM(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def minicons_style_nll(scorer: Any, text: str) -> float:
    """Float32 pseudo-NLL with every masked copy of ``text`` in one batch and the full
    model's logits at every position (how minicons scores), for timing."""
    import torch

    enc = scorer.tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    positions = [i for i, s in enumerate(enc["special_tokens_mask"]) if not s]
    if not positions:
        return math.nan
    batch = ids.repeat(len(positions), 1)
    rows = torch.arange(len(positions))
    pos = torch.tensor(positions)
    batch[rows, pos] = scorer.mask_id
    with torch.inference_mode():
        logits = scorer.model(input_ids=batch).logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # the whole vocabulary at every position
    picked = logp[rows, pos].gather(1, ids[pos].unsqueeze(1)).squeeze(1)
    return float(-picked.mean())


def _texts(settings: Settings, path: str | None) -> list[str]:
    from corpusfactory.seeds import load_seeds

    if not path:
        return [m.text for c in load_seeds(settings.producer.seed_file) for m in c.messages]
    out: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.extend(str(t["text"]) for t in json.loads(line).get("turns", ()))
    return out


def _threshold(settings: Settings, seed_nll: list[float]) -> float:
    from corpusfactory.engines.scoring.nll import percentile_of

    pct = settings.admission.nll_threshold_percentile
    if pct is None:
        return float(settings.admission.nll_threshold)
    return float(percentile_of([v for v in seed_nll if math.isfinite(v)], pct))


def bench_scorer(args: argparse.Namespace) -> dict[str, Any]:
    from corpusfactory.engines.models.registry import resolve_model
    from corpusfactory.engines.scoring.nll import MLMScorer, direct_nll

    s = load_settings(args.config)
    adm = s.admission
    seeds = _texts(s, None)
    texts = (seeds * (args.messages // len(seeds) + 1))[: args.messages]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    size = getattr(args, "size", "settings") or "settings"
    with tempfile.TemporaryDirectory(prefix="cf-bench-scorer-") as tmp:
        model_dir = resolve_model(s.models.scorer, s.models.models_dir)
        if size == "base":
            model_dir = str(random_bert_base(Path(tmp) / "bert-base", model_dir))
        runs: dict[str, Any] = {}
        nll_by: dict[str, list[float]] = {}
        scorers: dict[str, Any] = {}
        peaks: dict[str, float] = {}
        # The useful FLOPs of the texts are counted from a model that is not quantized: a
        # quantized linear layer holds packed weights, not parameters. The first such
        # scorer run counts; a float32 model is loaded for it only when int8 alone runs.
        counter: MLMScorer | None = None
        for precision in precisions:
            resolved = _auto(s.models.device) if precision == "auto" else precision
            peaks[resolved] = peak_gflops(resolved)
            fp32 = peaks.get("float32") or peak_gflops("float32")
            peaks.setdefault("float32", fp32)
            if resolved != "float32" and peaks[resolved] < SLOW_PRECISION * fp32:
                runs[resolved] = {
                    "skipped": f"{resolved} runs at {peaks[resolved]:.1f} GFLOP/s here, "
                    f"float32 at {fp32:.1f}: this hardware has no fast {resolved} path",
                    "peak_gflops": round(peaks[resolved], 2),
                }
                continue
            scorer = MLMScorer(
                model_dir,
                device=s.models.device,
                max_tokens=adm.max_tokens,
                masked_batch_size=adm.masked_batch_size,
                granularity=adm.nll_granularity,
                precision=precision,
            )
            scorer.score(texts[:8])  # warm-up
            t = time.perf_counter()
            results = scorer.score(texts)
            dt = time.perf_counter() - t
            tokens = [r.tokens for r in results]
            if counter is None and scorer.precision != "int8":
                counter = scorer
            if counter is None:
                counter = MLMScorer(model_dir, device=s.models.device, max_tokens=adm.max_tokens)
            achieved = counter.estimate_flops(tokens) / dt / 1e9
            peak = peaks[scorer.precision]
            runs[scorer.precision] = {
                "messages_per_s": round(len(texts) / dt, 2),
                "scored_tokens_per_s": round(sum(tokens) / dt, 1),
                "achieved_gflops": round(achieved, 2),
                "peak_gflops": round(peak, 2),
                "fraction_of_peak": round(achieved / peak, 4),
            }
            nll_by[scorer.precision] = [r.nll for r in results]
            scorers[scorer.precision] = scorer
        ref = scorers.get("float32")
        if ref is not None:
            base = runs["float32"]["messages_per_s"]
            for precision, run in runs.items():
                if "skipped" in run:
                    continue
                run["speedup_vs_float32"] = round(run["messages_per_s"] / base, 3)
                diffs = [
                    abs(a - b)
                    for a, b in zip(nll_by[precision], nll_by["float32"], strict=True)
                    if math.isfinite(a) and math.isfinite(b)
                ]
                run["nll_abs_diff_vs_float32"] = {
                    "max": round(max(diffs), 5),
                    "mean": round(sum(diffs) / len(diffs), 5),
                }
            plain = _plain_ways(ref, texts[: args.reference], direct_nll)
            plain["batched_speedup_vs_one_pass_per_copy"] = round(
                base / plain["one_pass_per_copy_messages_per_s"], 3
            )
            plain["batched_speedup_vs_minicons_style"] = round(
                base / plain["minicons_style_messages_per_s"], 3
            )
        else:
            plain = {}
        limit = int(getattr(args, "seed_messages", 0) or 0)
        calibration = _texts(s, None)[: limit or None]
        use = size == "settings" and ref is not None
        flips = _flips(s, scorers, args, calibration) if use else None
        early = _early_stop(s, ref, texts, calibration) if use else None
    return {
        "benchmark": "scorer",
        "size": size,
        "model": model_dir if size == "settings" else "random BERT-base (12 x 768, vocab 30522)",
        "messages": len(texts),
        "masked_batch_size": adm.masked_batch_size,
        "auto_precision": _auto(s.models.device),
        "precisions": runs,
        "float32_plain_ways": plain,
        "decision_flips": flips,
        "early_stop": early,
        "machine": machine(),
    }


def _auto(device: str) -> str:
    from corpusfactory.engines.hardware import fastest_precision

    return fastest_precision(device)


def _plain_ways(scorer: Any, texts: list[str], direct_nll: Any) -> dict[str, Any]:
    """Messages/s of the definition (one full pass per masked copy) and of minicons'
    batch, both float32, and their largest NLL difference from the batched scorer."""
    batched = [r.nll for r in scorer.score(texts)]
    t = time.perf_counter()
    direct = [direct_nll(scorer.model, scorer.tokenizer, x) for x in texts]
    t_direct = time.perf_counter() - t
    t = time.perf_counter()
    mini = [minicons_style_nll(scorer, x) for x in texts]
    t_mini = time.perf_counter() - t
    pairs = [(a, b) for a, b in zip(batched, direct, strict=True) if math.isfinite(b)]
    return {
        "messages": len(texts),
        "one_pass_per_copy_messages_per_s": round(len(texts) / t_direct, 3),
        "minicons_style_messages_per_s": round(len(texts) / t_mini, 3),
        "batched_max_abs_diff_vs_definition": round(max(abs(a - b) for a, b in pairs), 6),
        "minicons_max_abs_diff_vs_definition": round(
            max(abs(a - b) for a, b in zip(mini, direct, strict=True) if math.isfinite(b)), 6
        ),
    }


def _early_stop(
    settings: Settings, scorer: Any, texts: list[str], seeds: list[str]
) -> dict[str, Any]:
    """Float32 messages/s on ``texts`` with and without ``admission.nll_early_stop``
    at the seed threshold, best of 2 each, and the share of texts stopped early."""
    threshold = _threshold(settings, [r.nll for r in scorer.score(seeds)])
    best: dict[str, float] = {}
    stopped = over = 0
    for _ in range(2):
        for mode, stop in (("full", None), ("early_stop", threshold)):
            t = time.perf_counter()
            results = scorer.score(texts, stop_above=stop)
            best[mode] = max(best.get(mode, 0.0), len(texts) / (time.perf_counter() - t))
            if stop is not None:
                stopped = sum(r.lower_bound for r in results)
                over = sum(1 for r in results if r.tokens and r.nll >= threshold)
    return {
        "threshold": round(threshold, 4),
        "texts": len(texts),
        "rejected_on_nll": over,
        "stopped_early": stopped,
        "messages_per_s": {k: round(v, 2) for k, v in best.items()},
        "speedup": round(best["early_stop"] / best["full"], 3),
    }


def _flips(
    settings: Settings, scorers: dict[str, Any], args: argparse.Namespace, seeds: list[str]
) -> dict[str, Any]:
    """Per precision: its own seed threshold (from ``seeds``), and the decisions on
    ``--texts`` that differ from float32's (reject when nll >= threshold)."""
    decided = _texts(settings, getattr(args, "texts", None))
    out: dict[str, Any] = {"texts": len(decided), "source": getattr(args, "texts", None) or "seeds"}
    verdicts: dict[str, list[bool]] = {}
    for precision, scorer in scorers.items():
        threshold = _threshold(settings, [r.nll for r in scorer.score(seeds)])
        values = [r.nll for r in scorer.score(decided)]
        verdicts[precision] = [math.isfinite(v) and v < threshold for v in values]
        out[precision] = {"threshold": round(threshold, 4), "accepted": sum(verdicts[precision])}
    for precision, v in verdicts.items():
        out[precision]["flips_vs_float32"] = sum(
            a != b for a, b in zip(v, verdicts["float32"], strict=True)
        )
    return out
