"""Training the Italian scorer: its hyper-parameters, BERT's masking on length-bucketed
batches, the AdamW loop and the held-out masked-LM loss. Every random draw comes from
generators seeded by the hyper-parameters, so a build is deterministic."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from corpusfactory.engines.models.demo_training import masked_lm_loss, schedule

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ItalianScorerHParams:
    """The tokenizer, architecture and training schedule of the Italian scorer."""

    vocab_size: int = 4000
    min_frequency: int = 2
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 2  # head_dim 64
    intermediate_size: int = 512
    max_positions: int = 512  # MLMScorer scores texts up to 510 tokens
    max_len: int = 128  # training units are cut to this many tokens
    min_words: int = 4  # shorter "sentences" are mostly split abbreviations
    batch_tokens: int = 2048  # padded tokens per batch (length-bucketed)
    mask_prob: float = 0.3
    steps: int = 2000
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    dropout: float = 0.0
    seed: int = 2718
    threads: int = 2


def masked_batches(
    encoded: Sequence[Sequence[int]], tokenizer: Any, hp: ItalianScorerHParams
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless length-bucketed batches of about ``batch_tokens`` padded tokens, masked.

    Each pass shuffles the units, sorts windows of them by length, cuts the windows
    into batches of similar lengths and shuffles the batches: little padding, and
    every unit once per pass.
    """
    rng = random.Random(hp.seed + 1)
    gen = torch.Generator().manual_seed(hp.seed + 2)
    special_ids = set(tokenizer.all_special_ids)
    normal_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
    pad, mask = int(tokenizer.pad_token_id), int(tokenizer.mask_token_id)
    window = 64 * max(1, hp.batch_tokens // 32)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        plan: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i]))
            batch: list[int] = []
            for i in chunk:
                width = max(len(encoded[i]), max((len(encoded[j]) for j in batch), default=0))
                if batch and width * (len(batch) + 1) > hp.batch_tokens:
                    plan.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                plan.append(batch)
        rng.shuffle(plan)
        for batch in plan:
            yield mask_batch(batch, encoded, normal_ids, pad, mask, hp.mask_prob, gen)


def mask_batch(
    batch: Sequence[int],
    encoded: Sequence[Sequence[int]],
    normal_ids: torch.Tensor,
    pad: int,
    mask: int,
    mask_prob: float,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """BERT's masking: ``mask_prob`` of the tokens, 80% [MASK] / 10% random / 10% kept."""
    rows = len(batch)
    width = max(len(encoded[i]) for i in batch)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    for r, i in enumerate(batch):
        ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
    attention = (ids != pad).long()
    candidates = attention.bool()
    candidates[:, 0] = False  # [CLS]
    candidates[torch.arange(rows), attention.sum(1) - 1] = False  # [SEP]
    chosen = (torch.rand(ids.shape, generator=gen) < mask_prob) & candidates
    none = ~chosen.any(1)  # at least one target per sequence
    if none.any():
        first = torch.rand(ids.shape, generator=gen).masked_fill(~candidates, -1).argmax(1)
        chosen[none, first[none]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    draws = torch.randint(len(normal_ids), ids.shape, generator=gen)
    inputs[swap] = normal_ids[draws[swap]]
    return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


def encode_units(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids with [CLS]/[SEP]; a unit longer than ``max_len`` keeps its head and [SEP]."""
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]:
        out.append(ids[: max_len - 1] + ids[-1:] if len(ids) > max_len else list(ids))
    return out


def train_mlm(
    model: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    hp: ItalianScorerHParams,
    say: Progress,
) -> tuple[float, int]:
    """AdamW with warm-up and cosine decay; returns (mean loss of the last 20 steps,
    tokens seen)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=hp.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, hp.warmup_steps, hp.steps))
    model.train()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    report_every = max(1, hp.steps // 10)
    for step in range(hp.steps):
        batch = next(batches)
        tokens += int(batch["attention_mask"].sum())
        loss = masked_lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if (step + 1) % report_every == 0 or step + 1 == hp.steps:
            tail = losses[-report_every:]
            say(
                f"Italian scorer: step {step + 1}/{hp.steps}, loss {sum(tail) / len(tail):.3f}, "
                f"{time.perf_counter() - started:.0f} s"
            )
    model.eval()
    tail = losses[-min(20, len(losses)) :]
    return sum(tail) / len(tail), tokens


@torch.inference_mode()
def heldout_mlm_loss(
    model: Any, encoded: Sequence[Sequence[int]], tokenizer: Any, hp: ItalianScorerHParams
) -> float:
    """Masked-LM loss on held-out units under a fixed masking (a quick health figure)."""
    gen = torch.Generator().manual_seed(hp.seed + 3)
    special_ids = set(tokenizer.all_special_ids)
    normal_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
    pad, mask = int(tokenizer.pad_token_id), int(tokenizer.mask_token_id)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), 64):
        batch = mask_batch(order[start : start + 64], encoded, normal_ids, pad, mask, 0.15, gen)
        n = int((batch["labels"] != -100).sum())
        total += float(masked_lm_loss(model, batch)) * n
        count += n
    return total / max(1, count)
