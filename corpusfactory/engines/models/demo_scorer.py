"""The toy scorer of the demo models: a tiny BERT masked LM trained on the seed messages.

``build_scorer`` trains a cased WordPiece tokenizer (``scorer_tokenizer``, whose
deterministic recipe the Italian scorer reuses) and a small ``BertForMaskedLM`` with
BERT's 15% masking on the seed messages and their sentences, and saves both in one
directory; ``demo.build_demo_models`` calls it and caches the result.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpusfactory.chatformat import Message
from corpusfactory.engines.models.demo_training import (
    masked_lm_loss,
    message_texts,
    no_progress_bars,
    train,
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# Characters the scorer's WordPiece vocabulary always holds, alone and as "##x"
# continuations, so ordinary Italian text outside the seeds rarely becomes [UNK].
_SCORER_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "àèéìíîòóùúÀÈÉÌÍÒÓÙÚçÇñÑäöüÄÖÜß"
    ".,;:!?'\"()[]{}-_/\\@#%&*+=<>|~^`$€£°§«»“”‘’–—…"
)


@dataclass(frozen=True)
class ScorerHParams:
    """The scorer's tokenizer, architecture and training schedule."""

    vocab_size: int = 3000
    min_frequency: int = 2
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 512
    max_len: int = 128
    # Masked LM training sees only 15% of the tokens as targets, so it learns far more
    # slowly per step than the causal generator: two layers, large batches, a high
    # learning rate and no dropout get it past the unigram plateau within the budget.
    batch_size: int = 64
    mask_prob: float = 0.15
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    dropout: float = 0.0
    seed: int = 4321


# -- scorer -------------------------------------------------------------------------


def scorer_tokenizer(texts: list[str], hp: ScorerHParams) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    def fresh(model: Any) -> Any:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok

    # The trainer numbers the "##x" continuation pieces in hash-map order, and its merge
    # ties are broken by those numbers: the vocabulary then changes from run to run.
    # Registering every "##x" up front (as trainer specials, in sorted order) fixes the
    # numbering and so makes the training deterministic. It also makes every alphabet
    # character usable inside a word, so a word is [UNK] only when it holds a character
    # outside the alphabet and the seeds.
    chars = sorted(set(_SCORER_ALPHABET) | {c for t in texts for c in t if not c.isspace()})
    trainer = WordPieceTrainer(
        vocab_size=hp.vocab_size,
        min_frequency=hp.min_frequency,
        special_tokens=specials + [f"##{c}" for c in chars],
        initial_alphabet=chars,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    trained = fresh(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    trained.train_from_iterator(texts, trainer=trainer)
    # Rebuild from the learned vocabulary, so that only the real specials are special.
    vocab = trained.get_vocab(with_added_tokens=False)
    ordered = sorted(vocab, key=vocab.__getitem__)
    tok = fresh(
        models.WordPiece(
            {t: i for i, t in enumerate(ordered)}, unk_token="[UNK]", max_input_chars_per_word=100
        )
    )
    tok.add_special_tokens(specials)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=hp.max_positions,
        clean_up_tokenization_spaces=False,
    )


def _scorer_units(convs: Sequence[Sequence[Message]]) -> list[str]:
    """Training texts: every message, and each sentence of a multi-sentence message."""
    units: list[str] = []
    for text in message_texts(convs):
        units.append(text)
        sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
        if len(sentences) > 1:
            units.extend(sentences)
    return units


def _scorer_batches(
    encoded: list[list[int]], tokenizer: Any, hp: ScorerHParams
) -> Iterator[dict[str, torch.Tensor]]:
    """Random batches with BERT's masking: 15% of tokens, 80% [MASK] / 10% random / 10% kept."""
    rng = torch.Generator().manual_seed(hp.seed + 1)
    special_ids = set(tokenizer.all_special_ids)
    normal_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
    pad, mask = tokenizer.pad_token_id, tokenizer.mask_token_id
    while True:
        pick = torch.randint(len(encoded), (hp.batch_size,), generator=rng).tolist()
        width = max(len(encoded[i]) for i in pick)
        ids = torch.full((hp.batch_size, width), pad, dtype=torch.long)
        for r, i in enumerate(pick):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
        attention = (ids != pad).long()
        candidates = attention.bool()
        candidates[:, 0] = False  # [CLS]
        lengths = attention.sum(1)
        candidates[torch.arange(hp.batch_size), lengths - 1] = False  # [SEP]
        chosen = (torch.rand(ids.shape, generator=rng) < hp.mask_prob) & candidates
        # At least one target per sequence.
        none = ~chosen.any(1)
        if none.any():
            first = torch.rand(ids.shape, generator=rng).masked_fill(~candidates, -1).argmax(1)
            chosen[none, first[none]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=rng)
        inputs = ids.clone()
        inputs[chosen & (roll < 0.8)] = mask
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        draws = torch.randint(len(normal_ids), ids.shape, generator=rng)
        inputs[swap] = normal_ids[draws[swap]]
        yield {"input_ids": inputs, "attention_mask": attention, "labels": labels}


def build_scorer(
    out: Path, convs: Sequence[Sequence[Message]], hp: ScorerHParams
) -> dict[str, Any]:
    from transformers import BertConfig, BertForMaskedLM

    started = time.perf_counter()
    texts = message_texts(convs)
    tokenizer = scorer_tokenizer(texts, hp)
    units = _scorer_units(convs)
    encoded = [
        ids[: hp.max_len - 1] + ids[-1:] if len(ids) > hp.max_len else ids
        for ids in tokenizer(units, add_special_tokens=True)["input_ids"]
    ]
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hp.hidden_size,
        num_hidden_layers=hp.num_layers,
        num_attention_heads=hp.num_heads,
        intermediate_size=hp.intermediate_size,
        max_position_embeddings=hp.max_positions,
        hidden_dropout_prob=hp.dropout,
        attention_probs_dropout_prob=hp.dropout,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(hp.seed)
    model = BertForMaskedLM(config)
    final_loss, _ = train(
        model,
        masked_lm_loss,
        _scorer_batches(encoded, tokenizer, hp),
        hp.steps,
        hp.lr,
        hp.warmup_steps,
        hp.weight_decay,
        "scorer",
    )
    out.mkdir(parents=True)
    with no_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "model": "scorer",
        "architecture": "BertForMaskedLM",
        "description": "Tiny masked LM trained with 15% masking on the seed messages.",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "training_sequences": len(encoded),
        "steps": hp.steps,
        "final_loss": round(final_loss, 4),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
