"""Training data: which accepted conversations a snapshot trains on, and their tokens.

* ``TrainingConversation`` is an accepted conversation reduced to what training needs,
  plus where it came from on Kafka (partition, offset).
* ``split`` decides, per conversation, whether it is trained on, held out for
  evaluation, or skipped (a source not selected, a truncated conversation when those
  are excluded). The held-out set is chosen by a hash of the conversation id, so it is
  the same in every snapshot and on every machine.
* ``tokenize`` renders a conversation in the chat format the producers use
  (``chatformat.ChatFormat``), one turn at a time so the loss can be limited to
  assistant turns, and ends it with the end-of-sequence token.
* ``make_blocks`` packs the token streams into ``seq_len`` blocks (conversations are
  concatenated; a block may hold the end of one and the start of the next, as in
  most causal-LM fine-tuning) or, with packing off, gives each conversation its own
  block, cut at ``seq_len`` and padded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.contract import AcceptedConversation

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


@dataclass(frozen=True)
class TrainingConversation:
    conversation_id: str
    source: str
    messages: tuple[Message, ...]
    truncated: bool = False
    partition: int = -1
    offset: int = -1

    @classmethod
    def from_accepted(
        cls, conv: AcceptedConversation, partition: int, offset: int
    ) -> TrainingConversation:
        return cls(
            conversation_id=conv.conversation_id,
            source=conv.source,
            messages=tuple(Message(t.role, t.text) for t in conv.turns),
            truncated=bool(conv.truncated),
            partition=partition,
            offset=offset,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "source": self.source,
            "truncated": self.truncated,
            "partition": self.partition,
            "offset": self.offset,
            "messages": [{"role": m.role, "text": m.text} for m in self.messages],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingConversation:
        return cls(
            conversation_id=data["conversation_id"],
            source=data.get("source", ""),
            messages=tuple(Message(m["role"], m["text"]) for m in data["messages"]),
            truncated=bool(data.get("truncated", False)),
            partition=int(data.get("partition", -1)),
            offset=int(data.get("offset", -1)),
        )


def is_heldout(conversation_id: str, percent: float) -> bool:
    """Whether a conversation belongs to the held-out set (``percent`` of all ids)."""
    if percent <= 0:
        return False
    bucket = xxhash.xxh64_intdigest(conversation_id.encode("utf-8")) % 10_000
    return bucket < round(percent * 100)


def split(
    conv: TrainingConversation,
    *,
    heldout_percent: float,
    sources: Sequence[str] | None,
    include_truncated: bool,
) -> str:
    """``"train"``, ``"heldout"``, ``"skip_source"`` or ``"skip_truncated"``."""
    if sources is not None and conv.source not in sources:
        return "skip_source"
    if conv.truncated and not include_truncated:
        return "skip_truncated"
    if is_heldout(conv.conversation_id, heldout_percent):
        return "heldout"
    return "train"


def data_hash(conversations: Iterable[TrainingConversation]) -> str:
    """sha256 of the training data in training order (ids, roles and texts)."""
    h = hashlib.sha256()
    for conv in conversations:
        record = [conv.conversation_id, [[m.role, m.text] for m in conv.messages]]
        h.update(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def write_jsonl(path: Path, conversations: Iterable[TrainingConversation]) -> int:
    """Write conversations as JSONL, fsynced; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps(conv.to_json(), ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def read_jsonl(path: Path) -> Iterator[TrainingConversation]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield TrainingConversation.from_json(json.loads(line))


# -- tokens ---------------------------------------------------------------------------


def tokenize(
    tokenizer: Any, messages: Sequence[Message], fmt: ChatFormat, loss_on: str = "all"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation in the chat format, ending in EOS.

    The text is ``fmt.render(messages)``, tokenized whole: tokenizing turns one by one
    would change the text with tokenizers that mark word starts (SentencePiece's
    ``▁`` before every piece). Labels come from the tokens' character offsets: with
    ``loss_on="assistant"`` only tokens overlapping an assistant turn's text (and the
    final EOS) carry labels.
    """
    text = fmt.render(messages)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids: list[int] = list(enc["input_ids"])
    if loss_on == "all":
        labels = list(ids)
    else:
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, msg in enumerate(messages):
            head = f"{fmt.tag(msg.role)} "
            start = pos + len(head)
            end = start + len(msg.text.strip())
            if msg.role == "assistant":
                spans.append((start, end))
            pos = end + 1  # the newline between turns
            assert i == len(messages) - 1 or text[end] == "\n", "render layout changed"
        labels = [
            tok if any(s < b and a < e for s, e in spans) and b > a else IGNORE_INDEX
            for tok, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids, labels


@dataclass(frozen=True)
class Block:
    input_ids: list[int]
    labels: list[int]
    attention: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def make_blocks(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, packing: bool, pad_id: int
) -> list[Block]:
    """Fixed-length blocks; padding has attention 0 and label IGNORE_INDEX."""
    blocks: list[Block] = []

    def add(ids: list[int], labels: list[int]) -> None:
        pad = seq_len - len(ids)
        blocks.append(
            Block(
                ids + [pad_id] * pad,
                labels + [IGNORE_INDEX] * pad,
                [1] * len(ids) + [0] * pad,
            )
        )

    if not packing:
        for ids, labels in examples:
            add(ids[:seq_len], labels[:seq_len])
        return blocks
    stream_ids: list[int] = []
    stream_labels: list[int] = []
    for ids, labels in examples:
        stream_ids += ids
        stream_labels += labels
    for start in range(0, len(stream_ids), seq_len):
        chunk = stream_ids[start : start + seq_len]
        if len(chunk) > 1:  # a lone token teaches nothing
            add(chunk, stream_labels[start : start + seq_len])
    return blocks
