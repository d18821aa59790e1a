"""The masked-LM quality score (method.md §3).

For a text of N non-special tokens T_1..T_N, the score is the mean pseudo
negative log-likelihood under a masked language model::

    NLL = (1/N) * sum_i -log p(T_i | T_1..T_{i-1}, [MASK], T_{i+1}..T_N)

with the natural log, one masked copy of the text per token, and the special
tokens ([CLS]/[SEP], <s>/</s>) present as context but never scored. Lower is
better: a fluent text is easy to predict token by token.

``MLMScorer`` computes exactly that, fast: every masked copy of every text in a
call is built up front, the copies are run through the encoder in batches of
``masked_batch_size`` (padded per batch, texts sorted by length so a batch holds
copies of similar length), and the MLM head — the costly vocabulary projection —
is applied only to the hidden state at each copy's masked position.
``direct_nll`` is the plain reference (one full forward pass per masked copy)
that the tests compare it with.

Texts longer than ``max_tokens`` scorer tokens are not scored: they come back
with ``too_long=True`` and ``nll=nan`` and the admission rejects them (a text
that long is not a chat turn we want, and truncating it would score a text
other than the one admitted). An empty text (0 tokens) has ``nll=nan`` and
``tokens=0``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from corpusfactory.engines.hardware import fastest_precision
from corpusfactory.errors import ModelError
from corpusfactory.settings import Settings
from corpusfactory.text import split_sentences

Granularity = Literal["message", "sentence"]


@dataclass(frozen=True)
class NLLResult:
    """The score of one text: mean NLL per token (nat), the token count, the length flag."""

    nll: float
    tokens: int
    too_long: bool
    lower_bound: bool = False  # scoring stopped early (``stop_above``): the mean so far


def _mlm_head(model: nn.Module) -> nn.Module | None:
    """The module mapping encoder hidden states to vocabulary logits, if the model has one.

    BERT-family models keep it in ``cls``, RoBERTa-family ones in ``lm_head``. For any
    other layout we return None and the scorer falls back to the full model's logits.
    """
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def encoder_parameters(model: nn.Module) -> int:
    """Parameters of the encoder that take part in matrix products (embeddings excluded)."""
    base = getattr(model, "base_model", model)
    total = sum(p.numel() for p in base.parameters())
    embeddings = getattr(base, "embeddings", None)
    if isinstance(embeddings, nn.Module):
        total -= sum(p.numel() for p in embeddings.parameters())
    return total


def flops_per_masked_copy(model: Any, seq_len: int) -> float:
    """Estimated FLOPs of scoring one masked copy of ``seq_len`` tokens (specials included).

    The usual forward-pass estimate: 2 FLOPs (a multiply and an add) per encoder parameter
    per position, ``2 * P_enc * seq_len``, with P_enc the encoder's non-embedding
    parameters (an embedding lookup is not a matrix product); plus the attention scores
    and weighted sum, ``4 * layers * seq_len^2 * hidden``; plus the MLM head, applied at
    one position only, ``2 * (hidden^2 + hidden * vocab)``. Layer norms, activations
    and the softmax are left out, so this is a slight under-estimate — fine for
    reporting GFLOP/s of a benchmark, not for anything exact.
    """
    cfg = model.config
    hidden = int(cfg.hidden_size)
    layers = int(cfg.num_hidden_layers)
    vocab = int(cfg.vocab_size)
    linear = 2.0 * encoder_parameters(model) * seq_len
    attention = 4.0 * layers * seq_len * seq_len * hidden
    head = 2.0 * (hidden * hidden + hidden * vocab)
    return linear + attention + head


def flops_per_token_estimate(model: Any, seq_len: int) -> float:
    """Estimated FLOPs per scored token of a text of ``seq_len`` tokens (specials included).

    Scoring a token costs one masked copy of the whole text, so this is
    ``flops_per_masked_copy(model, seq_len)``; a text of N scored tokens costs N times it.
    """
    return flops_per_masked_copy(model, seq_len)


@dataclass
class _Unit:
    """One sequence to score: the ids with specials, the positions scored."""

    ids: list[int]
    positions: list[int]


class MLMScorer:
    """Scores texts with a masked LM: mean pseudo-NLL per token (see the module docstring).

    ``model`` is a local directory or a model id (``demo:scorer`` names the demo scorer
    built by ``corpusfactory.engines.models.demo``). ``granularity="sentence"`` splits each text
    into sentences, scores each sentence in its own context, and returns the token-weighted
    mean of the sentence scores (the total NLL over the total tokens); a text is then
    ``too_long`` if one of its sentences is longer than ``max_tokens``.
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        max_tokens: int = 510,
        masked_batch_size: int = 128,
        granularity: Granularity = "message",
        precision: str = "float32",
    ) -> None:
        if masked_batch_size < 1:
            raise ValueError("masked_batch_size must be at least 1")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if granularity not in ("message", "sentence"):
            raise ValueError(f"granularity must be 'message' or 'sentence', not {granularity!r}")
        name = str(model)
        if name.startswith("demo:"):
            from corpusfactory.engines.models.registry import resolve_model

            name = resolve_model(name)
        self.id = name
        self.device = torch.device(device)
        self.masked_batch_size = masked_batch_size
        self.granularity: Granularity = granularity
        self.tokenizer, self.model = load_mlm(name, self.device)
        if precision == "auto":
            precision = fastest_precision(str(self.device))
        self.precision = precision
        self.model = _with_precision(self.model, precision, self.device)
        self._head = _mlm_head(self.model)
        self._encoder: Any = self.model.base_model if self._head is not None else None
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        limit = int(getattr(self.model.config, "max_position_embeddings", 512)) - specials
        self.max_tokens = max(1, min(max_tokens, limit))
        mask_id = self.tokenizer.mask_token_id
        pad_id = self.tokenizer.pad_token_id
        if mask_id is None:
            raise ModelError(f"scorer {name}: the tokenizer has no mask token")
        self.mask_id = int(mask_id)
        self.pad_id = int(pad_id) if pad_id is not None else 0

    # -- public -----------------------------------------------------------------

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str | None = None, device: str | None = None
    ) -> MLMScorer:
        """The scorer the settings describe (``models.scorer``, ``admission.*``):
        the one the scorer worker, the report, evaluation and the benchmarks use."""
        from corpusfactory.engines.models.registry import resolve_model

        adm = settings.admission
        return cls(
            resolve_model(model or settings.models.scorer, settings.models.models_dir),
            device=device or settings.models.device,
            max_tokens=adm.max_tokens,
            masked_batch_size=adm.masked_batch_size,
            granularity=adm.nll_granularity,
            precision=adm.scorer_precision,
        )

    @property
    def label(self) -> str:
        """The scorer as decisions name it: its model, and its precision unless float32."""
        return self.id if self.precision == "float32" else f"{self.id}@{self.precision}"

    def score(self, texts: Sequence[str], stop_above: float | None = None) -> list[NLLResult]:
        """Score each text; results in the order of ``texts``.

        ``stop_above`` (message granularity only; ignored per sentence, where one
        sentence over the bar says nothing of the text's mean): a text's positions are
        scored in ``EARLY_STOP_ROUNDS`` rounds, and a text whose NLL sum reaches
        ``stop_above`` times its token count is not scored further. Every term is
        non-negative, so its mean is then certainly at or above ``stop_above``; it is
        returned with ``lower_bound=True`` and the mean over all its tokens of the sum
        so far, a lower bound of its NLL.
        """
        if self.granularity == "message":
            return self._score_units(list(texts), stop_above)
        pieces: list[list[str]] = [split_sentences(t) for t in texts]
        flat = [s for p in pieces for s in p]
        scored = self._score_units(flat)
        out: list[NLLResult] = []
        k = 0
        for p in pieces:
            parts = scored[k : k + len(p)]
            k += len(p)
            tokens = sum(r.tokens for r in parts)
            if any(r.too_long for r in parts):
                out.append(NLLResult(math.nan, tokens, True))
            elif tokens == 0:
                out.append(NLLResult(math.nan, 0, False))
            else:
                total = math.fsum(r.nll * r.tokens for r in parts if r.tokens)
                out.append(NLLResult(total / tokens, tokens, False))
        return out

    def estimate_flops(self, token_counts: Sequence[int]) -> float:
        """Estimated FLOPs of scoring texts of these token counts (see flops_per_masked_copy).

        Counts the texts as whole units (message granularity); with sentence granularity
        the attention term is over-estimated a little, the rest is the same.
        """
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        return math.fsum(
            n * flops_per_masked_copy(self.model, n + specials)
            for n in token_counts
            if 0 < n <= self.max_tokens
        )

    # -- internals --------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[_Unit]:
        if not texts:
            return []
        enc = self.tokenizer(
            texts,
            add_special_tokens=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            truncation=False,
            verbose=False,
        )
        units = []
        for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"], strict=True):
            units.append(_Unit(list(ids), [i for i, s in enumerate(special) if not s]))
        return units

    @torch.inference_mode()
    def _score_units(self, texts: list[str], stop_above: float | None = None) -> list[NLLResult]:
        units = self._tokenize(texts)
        results: list[NLLResult | None] = [None] * len(units)
        todo: list[int] = []
        for i, u in enumerate(units):
            n = len(u.positions)
            if n == 0:
                results[i] = NLLResult(math.nan, 0, False)
            elif n > self.max_tokens:
                results[i] = NLLResult(math.nan, n, True)
            else:
                todo.append(i)
        # Longest first, so each batch holds copies of similar length (little padding).
        todo.sort(key=lambda i: -len(units[i].ids))
        sums = dict.fromkeys(todo, 0.0)
        rounds = 1 if stop_above is None else EARLY_STOP_ROUNDS
        live = list(todo)
        stopped: set[int] = set()
        for r in range(rounds):
            copies = [(i, p) for i in live for p in _share(units[i].positions, r, rounds)]
            self._run_copies(units, copies, sums)
            if stop_above is not None and r < rounds - 1:
                over = {i for i in live if sums[i] >= stop_above * len(units[i].positions)}
                stopped |= over
                live = [i for i in live if i not in over]
        for i in todo:
            n = len(units[i].positions)
            results[i] = NLLResult(sums[i] / n, n, False, lower_bound=i in stopped)
        return cast(list[NLLResult], results)  # every slot is filled above

    def _run_copies(
        self, units: list[_Unit], copies: list[tuple[int, int]], sums: dict[int, float]
    ) -> None:
        """Add each masked copy's NLL to its text's sum, ``masked_batch_size`` at a time."""
        bs = self.masked_batch_size
        for start in range(0, len(copies), bs):
            batch = copies[start : start + bs]
            nll = self._run_batch([units[i].ids for i, _ in batch], [p for _, p in batch])
            for (i, _), value in zip(batch, nll.tolist(), strict=True):
                sums[i] += value

    def _run_batch(self, seqs: list[list[int]], positions: list[int]) -> torch.Tensor:
        """-log p(true token) at the masked position of each copy, as float64."""
        rows = len(seqs)
        width = max(len(s) for s in seqs)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention[r, : len(s)] = 1
        rows_idx = torch.arange(rows)
        pos = torch.tensor(positions, dtype=torch.long)
        targets = input_ids[rows_idx, pos].clone()
        input_ids[rows_idx, pos] = self.mask_id
        input_ids = input_ids.to(self.device)
        attention = attention.to(self.device)
        rows_idx = rows_idx.to(self.device)
        pos = pos.to(self.device)
        targets = targets.to(self.device)
        if self._head is not None and self._encoder is not None:
            hidden = self._encoder(input_ids=input_ids, attention_mask=attention)[0]
            logits = self._head(hidden[rows_idx, pos])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            logits = logits[rows_idx, pos]
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
        return (-picked).double().cpu()


EARLY_STOP_ROUNDS = 8  # a text's positions are scored in this many rounds with stop_above


def _share(positions: list[int], r: int, rounds: int) -> list[int]:
    """Round ``r`` of ``rounds`` of ``positions``: every ``rounds``-th one from ``r``,
    so each round covers the whole text (the start of a message is not all scored
    before its end)."""
    return positions[r::rounds]


def _with_precision(model: Any, precision: str, device: torch.device) -> Any:
    """``model`` in ``precision``: float32 as loaded, bfloat16 weights, or int8 dynamic
    quantization of every linear layer (CPU only; activations quantized per batch)."""
    if precision == "float32":
        return model
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if precision == "int8":
        if device.type != "cpu":
            raise ModelError("scorer precision int8 runs on the CPU only; use bfloat16 on a GPU")
        with warnings.catch_warnings():
            # torch announces the move of eager quantization to torchao (not a
            # dependency here) and the end of its quantized tensor types; the dynamic
            # int8 linear layer still runs on them in the locked torch.
            warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated")
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    raise ModelError(f"unknown scorer precision {precision!r}: float32, bfloat16 or int8")


def load_mlm(name: str, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """Load a masked-LM tokenizer and model (eval mode, on ``device``); ModelError on failure."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForMaskedLM.from_pretrained(name)
    except Exception as exc:  # the loaders raise many unrelated types
        raise ModelError(
            f"cannot load the scorer model {name!r}: {exc}. Give a local directory holding "
            "a masked LM and its tokenizer, or 'demo:scorer'."
        ) from exc
    model.to(device)
    model.eval()
    return tokenizer, model


@torch.inference_mode()
def direct_nll(model: Any, tokenizer: Any, text: str) -> float:
    """Reference pseudo-NLL of one text: one full forward pass per masked token.

    Slow and plain on purpose: the whole model (not only the encoder plus a gathered
    head) is run on each masked copy, unpadded, and the full logits are used. Returns
    nan for a text with no tokens.
    """
    enc = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    scored = [i for i, s in enumerate(enc["special_tokens_mask"]) if not s]
    if not scored:
        return math.nan
    device = next(model.parameters()).device
    total = 0.0
    for i in scored:
        masked = ids.clone()
        masked[0, i] = tokenizer.mask_token_id
        logits = model(input_ids=masked.to(device)).logits[0, i]
        total += -float(torch.log_softmax(logits.float(), dim=-1)[ids[0, i]])
    return total / len(scored)


def scored_values(results: Sequence[NLLResult]) -> list[float]:
    """The NLL of each result that has one: empty and too-long texts get no score (the
    scorer worker rejects such turns unscored)."""
    return [r.nll for r in results if not r.too_long and r.tokens > 0]


def percentile_of(values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (0-100, linear interpolation) of NLL values; ModelError
    when there is none."""
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"pct must lie in [0, 100], got {pct}")
    if not values:
        raise ModelError("no text could be scored, so no NLL percentile can be computed")
    return float(np.percentile(np.asarray(values, dtype=np.float64), pct))


def nll_percentile(
    scorer: MLMScorer | Callable[[list[str]], list[NLLResult]],
    texts: Sequence[str],
    pct: float,
) -> float:
    """The ``pct``-th percentile (0-100, linear interpolation) of the texts' NLL scores.

    Used to turn "admit what scores like the best P% of the seed messages" into an NLL
    threshold. Texts that cannot be scored (empty, too long) are left out; ModelError if
    none is left.
    """
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"pct must lie in [0, 100], got {pct}")
    score = scorer.score if isinstance(scorer, MLMScorer) else scorer
    return percentile_of(scored_values(score(list(texts))), pct)
