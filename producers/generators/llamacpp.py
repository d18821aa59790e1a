"""The llama.cpp backend: a GGUF model run in-process on CPU (llama-cpp-python).

The high-level ``llama_cpp.Llama`` generates one sequence at a time, so this
backend drives llama.cpp's C API (``llama_cpp.llama_*``) directly to decode the
prompts of a call *together*: one context holds ``batch`` sequences (its
``n_seq_max``), each prompt gets a sequence id and is prefilled on its own, and
every step then decodes the next token of every unfinished sequence in one
``llama_decode`` batch. Each sequence samples with its own sampler chain.

Prompt reuse: the tokens a sequence holds in the KV cache are remembered after a
call. The next call gives each prompt the free sequence whose cached tokens share
the longest prefix with it, keeps that prefix (``llama_memory_seq_rm`` drops the
rest) and prefills only the remainder. A self-chat conversation's next prompt is
its previous prompt plus the turn just generated, and a regeneration repeats its
prompt exactly, so most of every prompt is already in the cache. Gemma 3's
sliding-window layers would drop old positions, which makes a cached prefix
unusable, so the cache keeps the full window (``swa_full``).

Reproducibility: the same calls on a fresh generator give the same outputs, so a
rerun of the producer reproduces its turns. Outputs are not batch-invariant:
llama.cpp's CPU kernels round differently with the shape of a batch and the
layout of the KV cache, so a prompt resumed from the cache, or decoded beside
others, can take another token at a near-tie even greedily. Each sequence has
its own KV stream (``kv_unified`` off), prompts are prefilled one sequence per
``llama_decode``, and flash attention is off: measured with llama-cpp-python
0.3.36 on Gemma 3 270M, fresh prompts decoded together then gave logits
bit-identical to each prompt decoded alone, which a unified KV buffer, several
prompts in one prefill batch, or CPU flash attention did not (logits off by up to
about 1 on a scale of 15).

Sampling matches the transformers and vLLM backends: temperature, then nucleus
(top-p) on the tempered distribution, no top-k, no repetition penalty;
``temperature == 0`` is greedy. Prompt ``i`` of call ``n`` samples with the seed
``derive_seed(params.seed, n, i)``: a rerun reproduces the same outputs and a
regeneration (a later call) samples anew. Generation of a sequence ends at an
end-of-generation token, at ``max_new_tokens``, or as soon as its text holds a
stop string. Install: ``pip install llama-cpp-python``.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpusfactory.errors import GeneratorError
from corpusfactory.settings import GenerationSettings
from corpusfactory.text import cut_at_stop
from producers.generators.base import derive_seed

# Tokens per llama_decode call while prefilling (llama.cpp's n_batch and n_ubatch).
PREFILL_CHUNK = 512
# A llama_decode result of 1 means "no KV slot": the cache is full.
_DECODE_ERRORS = {
    1: "no room in the KV cache (raise producer.llamacpp_n_ctx)",
    2: "aborted",
    -1: "invalid input batch",
}


def available_cores() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Row:
    """One prompt of a call while it is generated."""

    index: int  # position of the prompt in the call
    seq: int  # llama.cpp sequence id
    tokens: list[int]  # the prompt's tokens
    pending: list[int]  # prompt tokens still to prefill
    pos: int  # position of the next token to decode
    sampler: Any = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


class LlamaCppGenerator:
    """A GGUF file decoded by llama.cpp, several sequences per step."""

    def __init__(
        self,
        model_path: str,
        *,
        threads: int | None = None,
        n_ctx: int = 2048,
        batch: int = 8,
        swa_full: bool = True,
        kv_unified: bool = False,
        flash_attn: bool = False,
    ) -> None:
        path = Path(model_path).expanduser()
        if path.is_dir():
            raise GeneratorError(
                f"llamacpp generator: {path} is a directory; the llamacpp backend runs a "
                "GGUF file: set models.generator to gemma3-270m or to a .gguf path (make "
                "one from a transformers directory with `corpusfactory build`)"
            )
        if not path.is_file():
            raise GeneratorError(f"llamacpp generator: GGUF file {path} does not exist")
        if n_ctx < 2:
            raise GeneratorError(f"llamacpp generator: n_ctx={n_ctx} is too small")
        if batch < 1:
            raise GeneratorError(f"llamacpp generator: batch={batch} must be at least 1")
        try:
            import llama_cpp
        except ImportError as exc:
            raise GeneratorError(
                f"the 'llamacpp' generator backend needs llama-cpp-python, which cannot be "
                f"imported ({exc}); install it with: pip install llama-cpp-python"
            ) from exc
        self._ll: Any = llama_cpp
        # llama-cpp-python routes llama.cpp's log through this logger; keep errors only.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        self.threads = threads or available_cores()
        self.batch = batch
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not model:
            raise GeneratorError(
                f"llamacpp generator: cannot load {path} (not a GGUF model llama.cpp reads)"
            )
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        trained = int(llama_cpp.llama_model_n_ctx_train(model))
        # Positions past the trained context give garbage; llama.cpp only warns.
        self.n_ctx = min(n_ctx, trained) if trained > 0 else n_ctx
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * batch  # the KV cache holds n_ctx per sequence
        cparams.n_batch = PREFILL_CHUNK
        cparams.n_ubatch = PREFILL_CHUNK
        cparams.n_seq_max = batch
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        cparams.swa_full = swa_full  # keep every position, so a cached prefix stays usable
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise GeneratorError(
                f"llamacpp generator: cannot create a context for {path} "
                f"(n_ctx={self.n_ctx} x {batch} sequences)"
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(max(PREFILL_CHUNK, batch), 0, 1)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._cached: list[list[int]] = [[] for _ in range(batch)]  # tokens in each seq's KV
        self._calls = 0
        self._lock = threading.Lock()
        self.stats = {"prompt_tokens": 0, "reused_tokens": 0, "generated_tokens": 0}
        self.id = f"llamacpp:{path.name}"

    # -- tokens -----------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """``text``'s tokens, with BOS where the model wants one; special tokens not parsed."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, True, False)
        if n < 0:  # pragma: no cover - cap always suffices (one token per byte at most)
            raise GeneratorError(f"llamacpp generator: cannot tokenize a prompt ({n})")
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:  # the piece is longer than the buffer
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    # -- generation -------------------------------------------------------------

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        if not prompts:
            return []
        stops = [s for s in stop if s]
        with self._lock:
            if self._ctx is None:
                raise GeneratorError("llamacpp generator: generate() after close()")
            call = self._calls
            self._calls += 1
            budget = self.n_ctx - params.max_new_tokens
            if budget < 1:
                raise GeneratorError(
                    f"llamacpp generator: max_new_tokens={params.max_new_tokens} leaves no "
                    f"room for a prompt in n_ctx={self.n_ctx} (raise producer.llamacpp_n_ctx)"
                )
            tokens = [self._fit(self.tokenize(p), budget) for p in prompts]
            out: list[str] = [""] * len(prompts)
            for start in range(0, len(prompts), self.batch):
                part = list(range(start, min(start + self.batch, len(prompts))))
                rows = self._assign(part, tokens)
                try:
                    for row in rows:
                        row.sampler = self._sampler(
                            params, derive_seed(params.seed, call, row.index)
                        )
                    self._run(rows, params, stops)
                except GeneratorError:
                    self._forget()
                    raise
                finally:
                    for row in rows:
                        if row.sampler is not None:
                            self._ll.llama_sampler_free(row.sampler)
                            row.sampler = None
                for row in rows:
                    out[row.index] = cut_at_stop(row.text, stops)
        return out

    def _fit(self, toks: list[int], budget: int) -> list[int]:
        """Keep the end of an over-long prompt (and its BOS)."""
        if len(toks) <= budget:
            return toks
        keep = 1 if self._add_bos and budget > 1 else 0
        return toks[:keep] + toks[len(toks) - (budget - keep) :]

    def _assign(self, part: list[int], tokens: list[list[int]]) -> list[_Row]:
        """Give each prompt the sequence whose cache shares the longest prefix with it."""
        pairs = sorted(
            (
                (common_prefix(tokens[i], self._cached[s]), i, s)
                for i in part
                for s in range(self.batch)
            ),
            key=lambda x: (-x[0], x[1], x[2]),
        )
        rows: dict[int, _Row] = {}
        used: set[int] = set()
        for shared, i, s in pairs:
            if i in rows or s in used:
                continue
            used.add(s)
            toks = tokens[i]
            keep = min(shared, len(toks) - 1)  # decode at least one token for its logits
            if keep > 0 and not self._ll.llama_memory_seq_rm(self._mem, s, keep, -1):
                keep = 0
            if keep == 0:
                self._ll.llama_memory_seq_rm(self._mem, s, -1, -1)
            self._cached[s] = toks[:keep]
            self.stats["prompt_tokens"] += len(toks)
            self.stats["reused_tokens"] += keep
            rows[i] = _Row(index=i, seq=s, tokens=toks, pending=toks[keep:], pos=keep)
        return [rows[i] for i in part]

    def _sampler(self, params: GenerationSettings, seed: int) -> Any:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            if params.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def _decode(self, entries: list[tuple[_Row, int, bool]]) -> None:
        """Decode one batch of (row, token, wants logits) at each row's next position."""
        b = self._batch
        for j, (row, token, logits) in enumerate(entries):
            b.token[j] = token
            b.pos[j] = row.pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = row.seq
            b.logits[j] = logits
            row.pos += 1
            self._cached[row.seq].append(token)
        b.n_tokens = len(entries)
        rc = self._ll.llama_decode(self._ctx, b)
        if rc != 0:
            why = _DECODE_ERRORS.get(rc, "fatal error")
            raise GeneratorError(f"llamacpp generator: llama_decode failed ({rc}: {why})")

    def _run(self, rows: list[_Row], params: GenerationSettings, stops: list[str]) -> None:
        decoders = {row.seq: codecs.getincrementaldecoder("utf-8")("replace") for row in rows}
        longest = max((len(s) for s in stops), default=0)

        def take(row: _Row, idx: int) -> None:
            """Sample the row's next token from output ``idx`` of the last decode."""
            token = int(self._ll.llama_sampler_sample(row.sampler, self._ctx, idx))
            if self._ll.llama_vocab_is_eog(self._vocab, token):
                row.done = True
                return
            row.generated.append(token)
            before = len(row.text)
            row.text += decoders[row.seq].decode(self._piece(token))
            tail = row.text[max(0, before - longest) :]
            if len(row.generated) >= params.max_new_tokens or any(s in tail for s in stops):
                row.done = True

        # Prefill: each row's remaining prompt tokens, one sequence per decode (see
        # the module's note on exactness); logits for its last prompt token only.
        for row in rows:
            last = 0
            while row.pending:
                chunk, row.pending = row.pending[:PREFILL_CHUNK], row.pending[PREFILL_CHUNK:]
                last = len(chunk) - 1
                self._decode(
                    [(row, token, not row.pending and k == last) for k, token in enumerate(chunk)]
                )
            take(row, last)
        # Decode: one token of every unfinished row per step.
        while True:
            live = [row for row in rows if not row.done]
            if not live:
                break
            self._decode([(row, row.generated[-1], True) for row in live])
            for idx, row in enumerate(live):
                take(row, idx)
        for row in rows:
            self.stats["generated_tokens"] += len(row.generated)

    def _forget(self) -> None:
        """After a failed decode the KV cache is in an unknown state: empty it."""
        if self._mem is not None:
            self._ll.llama_memory_clear(self._mem, True)
        self._cached = [[] for _ in range(self.batch)]

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self._release()
        else:
            self._release()

    def _release(self) -> None:
        ll = self._ll
        batch, self._batch = self._batch, None
        if batch is not None:
            ll.llama_batch_free(batch)
        ctx, self._ctx = self._ctx, None
        self._mem = None
        if ctx is not None:
            ll.llama_free(ctx)
        model, self._model = self._model, None
        if model is not None:
            ll.llama_model_free(model)
        self._cached = []
