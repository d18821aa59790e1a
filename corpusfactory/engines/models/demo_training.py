"""Training helpers shared by the builders of the demo models.

The toy generator (``demo_generator``), the toy scorer (``demo_scorer``) and the
Italian scorer (``italian``) all train with these: the learning-rate schedule, the
training loop, the masked-LM loss, the message texts of the seed conversations, and
quiet saving (no transformers progress bars).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from corpusfactory.chatformat import Message

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bars while saving; restore after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    name: str,
) -> tuple[float, list[float]]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, warmup, steps))
    model.train()
    losses: list[float] = []
    for step in range(steps):
        batch = next(batches)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f", name, step + 1, steps, losses[-1])
    model.eval()
    tail = losses[-min(20, len(losses)) :]
    return sum(tail) / len(tail), losses


def message_texts(convs: Sequence[Sequence[Message]]) -> list[str]:
    return [" ".join(m.text.split()) for c in convs for m in c if m.text.strip()]


def masked_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy at the masked positions, the MLM head applied only there (cheaper)."""
    # base_model: the encoder of any *ForMaskedLM (BERT's .bert, RoFormer's .roformer)
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[
        0
    ]
    chosen = batch["labels"] != -100
    logits = model.cls(hidden[chosen])
    return torch.nn.functional.cross_entropy(logits, batch["labels"][chosen])
