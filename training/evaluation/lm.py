"""A causal LM behind the three operations evaluation needs: generate, score, perplexity.

``CausalLM`` wraps a Hugging Face causal LM directory (a snapshot, the base model or a demo
model) with transformers. Every evaluation task talks to it through these methods only:

* ``generate(prompts, max_new_tokens, stop)``: greedy decoding, batched with left padding,
  each output cut at the first stop string;
* ``loglikelihood([(context, continuation), ...])``: the summed log-probability (natural log)
  of the continuation's tokens given the context, used for rank classification;
* ``nll(texts)``: total negative log-likelihood and token count, for perplexity.

Prompts longer than the model's context are cut on the left (the end of a prompt holds the
question and the opening tag, the part that matters); ``fits`` tells callers whether a
prompt fits so they can first drop few-shot examples instead. Inference runs under
``torch.inference_mode`` in float32 on CPU and in the model's own dtype elsewhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from corpusfactory.engines.causal_lm import load_causal_lm
from corpusfactory.text import cut_at_stop

log = logging.getLogger(__name__)


class CausalLM:
    """A loaded causal LM and its tokenizer (load with ``CausalLM.load``)."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, batch_size: int = 8, device: str = "cpu"
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = max(1, batch_size)
        self.device = torch.device(device)
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(limit)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", batch_size: int = 8) -> CausalLM:
        tokenizer, model = load_causal_lm(
            path,
            device=device,
            dtype="float32" if device == "cpu" else "auto",
            what="evaluation",
        )
        return cls(model, tokenizer, str(path), batch_size=batch_size, device=device)

    # -- tokens ----------------------------------------------------------------------------

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=special, verbose=False)[
            "input_ids"
        ]
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def fits(self, prompt: str, max_new_tokens: int = 0) -> bool:
        """Whether the prompt plus ``max_new_tokens`` fits in the model's context."""
        return self.count_tokens(prompt) + max_new_tokens <= self.max_length

    # -- generation ------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """Continuations of ``prompts``, each cut at the first of ``stop``.

        Greedy by default; with ``temperature > 0`` sampled, reproducibly from ``seed``.
        """
        sample = temperature > 0
        if sample:
            torch.manual_seed(seed)
        budget = max(1, self.max_length - max_new_tokens)
        outputs: list[str] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            chunk = [self.encode(p)[-budget:] for p in prompts[start : start + self.batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=None,
                pad_token_id=pad,
            )
            for row in generated[:, width:]:
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(cut_at_stop(text, stop).strip())
        return outputs

    # -- scoring ---------------------------------------------------------------------------

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation tokens | context) for each (context, continuation)."""
        rows: list[tuple[list[int], int]] = []
        for context, continuation in requests:
            cont = self.encode(continuation, special=False)
            if not cont:
                raise ValueError(f"continuation {continuation!r} has no tokens")
            ids = (self.encode(context) + cont)[-self.max_length :]
            rows.append((ids, min(len(cont), len(ids) - 1)))
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            logprobs = self._token_logprobs([ids for ids, _ in chunk])
            for (ids, n_cont), lp in zip(chunk, logprobs, strict=True):
                scores.append(float(lp[len(ids) - 1 - n_cont :].sum()))
        return scores

    @torch.inference_mode()
    def nll(self, texts: Sequence[str]) -> tuple[float, int]:
        """Total NLL (nats) of every token after the first, and how many tokens were scored.

        A text longer than the context is scored in consecutive windows.
        """
        windows: list[list[int]] = []
        for text in texts:
            ids = self.encode(text)
            for begin in range(0, max(1, len(ids) - 1), self.max_length - 1):
                window = ids[begin : begin + self.max_length]
                if len(window) > 1:
                    windows.append(window)
        total, count = 0.0, 0
        for start in range(0, len(windows), self.batch_size):
            for lp in self._token_logprobs(windows[start : start + self.batch_size]):
                total -= float(lp.sum())
                count += len(lp)
        return total, count

    def perplexity(self, texts: Sequence[str]) -> dict[str, float]:
        total, count = self.nll(texts)
        mean_nll = total / count if count else float("nan")
        return {
            "nll": mean_nll,
            "perplexity": math.exp(mean_nll) if count else float("nan"),
            "tokens": count,
        }

    def _token_logprobs(self, batch: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """For each sequence, log p(token_i | tokens before i) for i = 1..len-1."""
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
        ).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = input_ids[:, 1:].to(self.device)
        picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu()
        return [picked[row, : len(ids) - 1] for row, ids in enumerate(batch)]
