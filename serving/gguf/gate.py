"""The quality gate of a GGUF build: how far it drifts from its full-precision model.

``gate(hf_dir, gguf_path, texts, budget)`` tokenizes each text with the Hugging Face
tokenizer (cut at ``max_tokens``), runs the same token ids through the full model
(transformers, float32) and through the build (llama.cpp, logits at every position),
and compares the next-token distributions at every position:

* ``kl_mean`` / ``kl_p99`` / ``kl_max``: KL(full || build), nats;
* ``top1_agreement``: share of positions where both pick the same most likely token;
* ``ppl_full`` / ``ppl_build``: perplexity of each on the texts' own next tokens, and
  ``ppl_delta_pct``, the build's relative increase in percent (negative: lower).

The build passes when ``kl_mean <= max_kl``, ``top1_agreement >= min_top1`` and
``ppl_delta_pct <= max_ppl_delta_pct``; ``failures`` names each check that failed and
by how much.

``llama_cpp_greedy`` and ``hf_greedy`` continue a prompt greedily (argmax, no
sampling, no stop) in each runtime, so a conversion can be checked token for token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corpusfactory.engines.causal_lm import load_causal_lm
from corpusfactory.settings import GateBudget

log = logging.getLogger(__name__)


# -- the two runtimes ------------------------------------------------------------------


def load_hf(hf_dir: str | Path) -> tuple[Any, Any]:
    """(tokenizer, float32 causal LM in eval mode) from a local directory."""
    return load_causal_lm(hf_dir, dtype="float32", what="GGUF gate reference")


def hf_token_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text's ids as the HF tokenizer gives them (special tokens added), cut."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        out.append([int(i) for i in ids[:max_tokens]])
    return out


def hf_logits(model: Any, token_ids: Sequence[int]) -> np.ndarray:
    """Next-token logits at every position, float64, shape (len(token_ids), vocab)."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([list(token_ids)], dtype=torch.long)).logits[0]
    return np.asarray(logits.to(torch.float64).numpy())


@contextlib.contextmanager
def open_llama(
    gguf_path: str | Path, n_ctx: int, *, n_threads: int | None = None, seed: int = 0
) -> Iterator[Any]:
    """A llama.cpp model keeping the logits of every position; closed on exit."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        n_threads=n_threads,
        seed=seed,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm: Any, token_ids: Sequence[int]) -> np.ndarray:
    """Next-token logits at every position from llama.cpp, float64, (len, vocab)."""
    llm.reset()
    llm.eval(list(token_ids))
    return np.array(llm.scores[: len(token_ids)], dtype=np.float64)


def _context_for(n_tokens: int) -> int:
    return max(64, n_tokens)


def llama_cpp_greedy(
    gguf_path: str | Path, token_ids: Sequence[int], n: int, *, n_threads: int | None = None
) -> list[int]:
    """``n`` tokens continuing ``token_ids`` greedily (argmax of llama.cpp's logits)."""
    prompt = list(token_ids)
    out: list[int] = []
    with open_llama(gguf_path, _context_for(len(prompt) + n), n_threads=n_threads) as llm:
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
    return out


def hf_greedy(model_or_dir: Any, token_ids: Sequence[int], n: int) -> list[int]:
    """``n`` tokens continuing ``token_ids`` greedily with transformers (float32)."""
    import torch

    model = load_hf(model_or_dir)[1] if isinstance(model_or_dir, (str, Path)) else model_or_dir
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    out: list[int] = []
    past = None
    with torch.inference_mode():
        step_input = ids
        for _ in range(n):
            result = model(step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            nxt = int(result.logits[0, -1].argmax())
            out.append(nxt)
            step_input = torch.tensor([[nxt]], dtype=torch.long)
    return out


# -- the comparison --------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(
    full: np.ndarray, build: np.ndarray, token_ids: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-position KL(full || build), top-1 agreement and the NLL of the next tokens."""
    if full.shape != build.shape:
        raise ValueError(f"logit shapes differ: full {full.shape}, build {build.shape}")
    return _Reference(full, token_ids).compare(build)


def _failures(stats: dict[str, Any], budget: GateBudget) -> list[dict[str, Any]]:
    checks = [
        ("kl_mean", stats["kl_mean"], "max_kl", budget.max_kl, "above"),
        ("top1_agreement", stats["top1_agreement"], "min_top1", budget.min_top1, "below"),
        (
            "ppl_delta_pct",
            stats["ppl_delta_pct"],
            "max_ppl_delta_pct",
            budget.max_ppl_delta_pct,
            "above",
        ),
    ]
    out = []
    for metric, value, limit_name, limit, bad in checks:
        failed = value > limit if bad == "above" else value < limit
        if failed:
            by = abs(value - limit)
            out.append(
                {
                    "metric": metric,
                    "value": value,
                    "limit": limit,
                    "by": by,
                    "message": f"{metric} {value:.6g} is {bad} {limit_name} {limit:g} by {by:.6g}",
                }
            )
    return out


def gate(
    hf_dir: str | Path,
    gguf_path: str | Path,
    texts: Sequence[str],
    budget: GateBudget,
    max_tokens: int = 512,
    *,
    n_threads: int | None = None,
    hf: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Score a GGUF build against its full model on ``texts``; see the module docstring.

    ``hf`` may pass an already loaded ``(tokenizer, model)`` pair (float32) to reuse
    across builds. Texts shorter than two tokens are skipped; ValueError if none is
    left. Returns ``kl_mean``, ``kl_p99``, ``kl_max``, ``top1_agreement``,
    ``ppl_full``, ``ppl_build``, ``ppl_delta_pct``, ``tokens`` (positions compared),
    ``texts`` (texts used), ``budget``, ``passed``, ``failures`` and ``seconds``.
    """
    return gate_many(
        hf_dir, {"build": (gguf_path, budget)}, texts, max_tokens, n_threads=n_threads, hf=hf
    )["build"]


def gate_many(
    hf_dir: str | Path,
    builds: Mapping[str, tuple[str | Path, GateBudget]],
    texts: Sequence[str],
    max_tokens: int = 512,
    *,
    n_threads: int | None = None,
    hf: tuple[Any, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``gate`` for several builds of one model (name -> (GGUF path, budget)) in one pass.

    The full model is loaded and run once per text, and its log-probabilities are
    shared by every build, so gating F16, Q8_0 and Q4_K_M together costs one reference
    pass instead of three (on Gemma 3 270M, 8 texts of 256 tokens on 2 cores: about 23 s
    of the 47 s each separate gate took). Returns each build's figures under its name;
    ``seconds`` is the time of the whole pass.
    """
    if not builds:
        raise ValueError("gate_many needs at least one build")
    started = time.perf_counter()
    tokenizer, model = hf if hf is not None else load_hf(hf_dir)
    all_ids = [ids for ids in hf_token_ids(tokenizer, texts, max_tokens) if len(ids) >= 2]
    if not all_ids:
        raise ValueError("the gate needs at least one text of two tokens or more")
    parts: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in builds}
    n_ctx = _context_for(max(len(ids) for ids in all_ids))
    with contextlib.ExitStack() as stack:
        llms = {
            name: stack.enter_context(open_llama(path, n_ctx, n_threads=n_threads))
            for name, (path, _) in builds.items()
        }
        for ids in all_ids:
            reference = _Reference(hf_logits(model, ids), ids)
            for name, llm in llms.items():
                build = llama_logits(llm, ids)
                if build.shape[1] != reference.vocab:
                    raise ValueError(
                        f"{builds[name][0]}: vocabulary of {build.shape[1]} tokens, the full "
                        f"model has {reference.vocab}"
                    )
                parts[name].append(reference.compare(build))
    seconds = round(time.perf_counter() - started, 3)
    return {
        name: _figures(builds[name][0], parts[name], builds[name][1], seconds) for name in builds
    }


class _Reference:
    """The full model's log-probabilities on one text, computed once for every build."""

    def __init__(self, full: np.ndarray, token_ids: Sequence[int]) -> None:
        self.shape = full.shape
        self.vocab = full.shape[1]
        self.lp = _log_softmax(full)
        self.p = np.exp(self.lp)
        self.top1 = full.argmax(axis=-1)
        self.targets = np.asarray(token_ids[1:], dtype=np.int64)
        self.rows = np.arange(len(self.targets))

    def compare(self, build: np.ndarray) -> dict[str, np.ndarray]:
        if build.shape != self.shape:
            raise ValueError(f"logit shapes differ: full {self.shape}, build {build.shape}")
        lp_build = _log_softmax(build)
        kl = np.sum(self.p * (self.lp - lp_build), axis=-1)
        return {
            "kl": np.maximum(kl, 0.0),  # rounding can make a zero KL slightly negative
            "agree": self.top1 == build.argmax(axis=-1),
            "nll_full": -self.lp[self.rows, self.targets],
            "nll_build": -lp_build[self.rows, self.targets],
        }


def _figures(
    gguf_path: str | Path,
    parts: list[dict[str, np.ndarray]],
    budget: GateBudget,
    seconds: float,
) -> dict[str, Any]:
    kl = np.concatenate([p["kl"] for p in parts])
    agree = np.concatenate([p["agree"] for p in parts])
    nll_full = np.concatenate([p["nll_full"] for p in parts])
    nll_build = np.concatenate([p["nll_build"] for p in parts])
    ppl_full = math.exp(float(nll_full.mean()))
    ppl_build = math.exp(float(nll_build.mean()))
    stats: dict[str, Any] = {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(agree.mean()),
        "ppl_full": ppl_full,
        "ppl_build": ppl_build,
        "ppl_delta_pct": (ppl_build - ppl_full) / ppl_full * 100.0,
        "tokens": int(kl.size),
        "texts": len(parts),
        "budget": budget.model_dump(),
    }
    failures = _failures(stats, budget)
    stats["passed"] = not failures
    stats["failures"] = failures
    stats["seconds"] = seconds
    log.info(
        "gate %s: kl %.5f, top1 %.4f, ppl %+.3f%% -> %s",
        gguf_path,
        stats["kl_mean"],
        stats["top1_agreement"],
        stats["ppl_delta_pct"],
        "pass" if stats["passed"] else "FAIL",
    )
    return stats
