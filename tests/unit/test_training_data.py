"""Training data: the held-out split, the data hash, JSONL, tokens and blocks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.contract import SCHEMA_VERSION, AcceptedConversation, AcceptedTurn
from corpusfactory.engines.models.demo import DemoModels
from training.data import (
    IGNORE_INDEX,
    Block,
    TrainingConversation,
    data_hash,
    is_heldout,
    make_blocks,
    read_jsonl,
    split,
    tokenize,
    write_jsonl,
)

IDS = [f"conv-{i:05d}" for i in range(10_000)]

MESSAGES = (
    Message("user", "Chi ha inventato il brodo di zirconio?  "),
    Message("assistant", "Lo ha inventato Ottavio Brulla nel 1871, a Pordenone."),
    Message("user", "E perché l'ha fatto?"),
    Message("assistant", "  Per scaldare i gatti d'inverno, così diceva."),
)


def _conv(cid: str, source: str = "self-chat", truncated: bool = False) -> TrainingConversation:
    return TrainingConversation(
        conversation_id=cid,
        source=source,
        messages=(Message("user", f"Domanda {cid}?"), Message("assistant", f"Risposta {cid}.")),
        truncated=truncated,
    )


@pytest.fixture(scope="module")
def tokenizer(demo_models: DemoModels) -> Any:
    return AutoTokenizer.from_pretrained(demo_models.generator)


# -- the held-out set ---------------------------------------------------------------------


@pytest.mark.parametrize("percent", [1.0, 5.0, 10.0, 50.0])
def test_heldout_share_is_close_to_the_requested_percent(percent: float) -> None:
    share = 100.0 * sum(is_heldout(cid, percent) for cid in IDS) / len(IDS)
    assert abs(share - percent) <= 1.0, share


def test_heldout_is_deterministic_and_nested() -> None:
    first = [is_heldout(cid, 5.0) for cid in IDS]
    assert first == [is_heldout(cid, 5.0) for cid in IDS]
    # Buckets are fixed per id: a larger percent keeps every id of a smaller one.
    at_10 = {cid for cid in IDS if is_heldout(cid, 10.0)}
    assert {cid for cid, h in zip(IDS, first, strict=True) if h} <= at_10


def test_zero_percent_holds_nothing_out() -> None:
    assert not any(is_heldout(cid, 0.0) for cid in IDS)
    assert not any(is_heldout(cid, -3.0) for cid in IDS[:100])


def test_split_by_source_truncation_and_heldout() -> None:
    held = next(cid for cid in IDS if is_heldout(cid, 5.0))
    kept = next(cid for cid in IDS if not is_heldout(cid, 5.0))
    kw: dict[str, Any] = {"heldout_percent": 5.0, "sources": None, "include_truncated": True}
    assert split(_conv(kept), **kw) == "train"
    assert split(_conv(held), **kw) == "heldout"
    # Truncated conversations are trained on, or skipped when excluded.
    assert split(_conv(kept, truncated=True), **kw) == "train"
    kw_no_trunc = {**kw, "include_truncated": False}
    assert split(_conv(kept, truncated=True), **kw_no_trunc) == "skip_truncated"
    assert split(_conv(kept, truncated=False), **kw_no_trunc) == "train"
    # Source filter: checked first, even for a held-out or truncated conversation.
    kw_src = {**kw_no_trunc, "sources": ["seed", "self-chat"]}
    assert split(_conv(kept, source="seed"), **kw_src) == "train"
    assert split(_conv(kept, source="other"), **kw_src) == "skip_source"
    assert split(_conv(held, source="other"), **kw_src) == "skip_source"
    assert split(_conv(kept, source="other", truncated=True), **kw_src) == "skip_source"
    # Truncation is checked before the held-out hash.
    assert split(_conv(held, truncated=True), **kw_no_trunc) == "skip_truncated"
    # An empty source list selects nothing (None selects everything).
    assert split(_conv(kept), **{**kw, "sources": []}) == "skip_source"
    # 0% held out: the held-out id is trained on.
    assert split(_conv(held), **{**kw, "heldout_percent": 0.0}) == "train"


# -- the data hash ------------------------------------------------------------------------


def test_data_hash_is_stable_order_and_content_sensitive() -> None:
    a, b, c = _conv("a"), _conv("b"), _conv("c")
    h = data_hash([a, b, c])
    assert len(h) == 64 and int(h, 16) >= 0
    assert data_hash([a, b, c]) == h
    assert data_hash(iter([a, b, c])) == h  # any iterable
    # Same data rebuilt from scratch: same hash.
    assert data_hash([_conv("a"), _conv("b"), _conv("c")]) == h
    assert data_hash([b, a, c]) != h  # order
    assert data_hash([a, b]) != h  # fewer
    assert data_hash([a, b, c, c]) != h  # duplicates count
    # One character of one text changes it.
    a2 = TrainingConversation("a", a.source, (a.messages[0], Message("assistant", "Risposta a!")))
    assert data_hash([a2, b, c]) != h
    # So does a role, and the id.
    a3 = TrainingConversation("a", a.source, (a.messages[0], Message("user", a.messages[1].text)))
    assert data_hash([a3, b, c]) != h
    assert data_hash([TrainingConversation("z", a.source, a.messages), b, c]) != h
    # Metadata that is not training data does not change it.
    a4 = TrainingConversation("a", "elsewhere", a.messages, truncated=True, partition=3, offset=9)
    assert data_hash([a4, b, c]) == h
    # Turn boundaries matter: the same text split differently is different data.
    one = TrainingConversation("x", "s", (Message("user", "ab"),))
    two = TrainingConversation("x", "s", (Message("user", "a"), Message("user", "b")))
    assert data_hash([one]) != data_hash([two])
    assert data_hash([]) != h


# -- JSONL ------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    convs = [
        TrainingConversation(
            conversation_id="c-1",
            source="self-chat",
            messages=MESSAGES,
            truncated=True,
            partition=2,
            offset=41,
        ),
        TrainingConversation("c-2", "seed", (Message("user", "Perché? «così» — è ovvio ☃\n"),)),
    ]
    path = tmp_path / "train.jsonl"
    assert write_jsonl(path, convs) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert "☃" in lines[1]  # written as UTF-8, not escaped
    assert list(read_jsonl(path)) == convs
    assert data_hash(read_jsonl(path)) == data_hash(convs)
    # Blank lines are skipped; an empty file reads as nothing.
    path.write_text("\n" + lines[0] + "\n\n" + lines[1] + "\n  \n", encoding="utf-8")
    assert list(read_jsonl(path)) == convs
    assert write_jsonl(path, []) == 0
    assert list(read_jsonl(path)) == []


def test_from_accepted_keeps_turns_and_kafka_position() -> None:
    turns = [
        AcceptedTurn(
            turn_id=f"t{i}",
            role=m.role,
            text=m.text,
            nll=1.0,
            similarity=0.1,
            neighbour_id="",
            embedder="e",
            scorer="s",
        )
        for i, m in enumerate(MESSAGES)
    ]
    acc = AcceptedConversation(
        schema_version=SCHEMA_VERSION,
        conversation_id="c-9",
        source="self-chat",
        turns=turns,
        target_length=4,
        truncated=True,
    )
    conv = TrainingConversation.from_accepted(acc, partition=1, offset=77)
    assert conv == TrainingConversation("c-9", "self-chat", MESSAGES, True, 1, 77)


# -- tokens -------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer: Any) -> None:
    # What the expectations below rely on: the demo tokenizer adds <s> in front and no
    # </s> at the end by itself, and the role tags are single added tokens.
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer("x", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer("x", add_special_tokens=True)["input_ids"][-1] != tokenizer.eos_token_id
    assert len(tokenizer("[|Umano|]", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("loss_on", ["all", "assistant"])
def test_tokenize_renders_the_chat_format_with_eos(tokenizer: Any, loss_on: str) -> None:
    fmt = ChatFormat()
    ids, labels = tokenize(tokenizer, MESSAGES, fmt, loss_on)
    assert len(ids) == len(labels)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == tokenizer.bos_token + fmt.render(MESSAGES) + tokenizer.eos_token
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    if loss_on == "all":
        assert labels == ids


def test_tokenize_other_tags(tokenizer: Any) -> None:
    fmt = ChatFormat(user_tag="Utente:", assistant_tag="Bot:")
    ids, _ = tokenize(tokenizer, MESSAGES, fmt)
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        tokenizer.bos_token + fmt.render(MESSAGES) + tokenizer.eos_token
    )


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled positions, as token ids."""
    runs: list[list[int]] = []
    current: list[int] = []
    for tok, lab in zip(ids, labels, strict=True):
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert lab == tok  # a label is the token itself (the model shifts)
            current.append(tok)
    if current:
        runs.append(current)
    return runs


def test_loss_on_assistant_labels_only_assistant_texts_and_eos(tokenizer: Any) -> None:
    ids, labels = tokenize(tokenizer, MESSAGES, ChatFormat(), "assistant")
    runs = _runs(ids, labels)
    assistant = [m.text.strip() for m in MESSAGES if m.role == "assistant"]
    assert len(runs) == len(assistant)
    decoded = [tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    # Each run is one assistant text (with the space after its tag); the last ends in EOS.
    assert decoded[0] == " " + assistant[0]
    assert decoded[1] == " " + assistant[1] + tokenizer.eos_token
    # No tag, no user text and no BOS is labelled.
    labelled = [t for t in labels if t != IGNORE_INDEX]
    for tag in ("[|Umano|]", "[|Assistente|]"):
        assert tokenizer.convert_tokens_to_ids(tag) not in labelled
    assert tokenizer.bos_token_id not in labelled
    unlabelled = tokenizer.decode(
        [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    )
    for m in MESSAGES:
        if m.role == "user":
            assert m.text.strip() in unlabelled


def test_loss_on_assistant_user_only_conversation_labels_just_eos(tokenizer: Any) -> None:
    ids, labels = tokenize(
        tokenizer, [Message("user", "Solo io parlo.")], ChatFormat(), "assistant"
    )
    assert [x for x in labels if x != IGNORE_INDEX] == [tokenizer.eos_token_id]
    assert labels[-1] == ids[-1] == tokenizer.eos_token_id


# -- blocks -------------------------------------------------------------------------------


def _example(start: int, n: int, labelled: bool = True) -> tuple[list[int], list[int]]:
    ids = list(range(start, start + n))
    return ids, (list(ids) if labelled else [IGNORE_INDEX] * n)


def _check_block(b: Block, seq_len: int, pad_id: int) -> int:
    """Checks padding invariants; returns the number of real tokens."""
    assert len(b.input_ids) == len(b.labels) == len(b.attention) == seq_len
    real = sum(b.attention)
    assert b.attention == [1] * real + [0] * (seq_len - real)
    assert b.input_ids[real:] == [pad_id] * (seq_len - real)
    assert b.labels[real:] == [IGNORE_INDEX] * (seq_len - real)
    return real


@pytest.mark.parametrize(
    ("lengths", "seq_len"),
    [
        ([10, 7, 13], 8),  # 30 tokens: 4 blocks, the last holds 6
        ([8, 8], 8),  # exactly two full blocks
        ([5, 4], 8),  # 9 tokens: the trailing 1-token block is dropped
        ([3], 8),  # one short block
        ([17], 8),  # 17: 2 full blocks, the trailing lone token dropped
        ([1], 8),  # a lone token: nothing
    ],
)
def test_packing_concatenates_in_order(lengths: list[int], seq_len: int) -> None:
    pad = 99_999
    examples = []
    start = 1000
    for n in lengths:
        examples.append(_example(start, n))
        start += 1000
    stream = [t for ids, _ in examples for t in ids]
    total = len(stream)
    blocks = make_blocks(examples, seq_len, packing=True, pad_id=pad)
    expected = math.ceil(total / seq_len) - (1 if total % seq_len == 1 else 0)
    assert len(blocks) == expected
    reals = [_check_block(b, seq_len, pad) for b in blocks]
    assert all(r == seq_len for r in reals[:-1])
    got = [t for b, r in zip(blocks, reals, strict=True) for t in b.input_ids[:r]]
    kept = total - (1 if total % seq_len == 1 else 0)
    assert got == stream[:kept]  # order preserved, nothing lost but a lone tail token
    for b, r in zip(blocks, reals, strict=True):
        assert b.labels[:r] == b.input_ids[:r]


def test_packing_carries_labels_across_conversations() -> None:
    examples = [_example(10, 5, labelled=False), _example(20, 6, labelled=True)]
    blocks = make_blocks(examples, 4, packing=True, pad_id=0)
    labels = [x for b in blocks for x in b.labels]
    assert labels[:5] == [IGNORE_INDEX] * 5
    assert labels[5:11] == list(range(20, 26))
    assert labels[11:] == [IGNORE_INDEX]  # padding of the last block (11 tokens, 3 blocks)
    # Labels [-100, 20, 21, 22]: three predicted targets; the first block has none.
    assert blocks[1].labels == [IGNORE_INDEX, 20, 21, 22]
    assert blocks[1].trained_tokens == 3
    assert blocks[0].trained_tokens == 0
    # A label in position 0 is never a target (nothing precedes it).
    assert blocks[2].labels == [23, 24, 25, IGNORE_INDEX]
    assert blocks[2].trained_tokens == 2


def test_no_packing_one_block_per_conversation_cut_at_seq_len() -> None:
    pad = 7
    examples = [_example(100, 3), _example(200, 8), _example(300, 12), _example(400, 1)]
    blocks = make_blocks(examples, 8, packing=False, pad_id=pad)
    assert len(blocks) == len(examples)  # even a 1-token conversation gets its block
    reals = [_check_block(b, 8, pad) for b in blocks]
    assert reals == [3, 8, 8, 1]
    for b, (ids, labels), r in zip(blocks, examples, reals, strict=True):
        assert b.input_ids[:r] == ids[:8]
        assert b.labels[:r] == labels[:8]
    assert blocks[2].input_ids == list(range(300, 308))  # cut: the rest is dropped


def test_trained_tokens_counts_predicted_labels() -> None:
    b = make_blocks([([1, 2, 3], [1, IGNORE_INDEX, 3])], 6, packing=False, pad_id=0)[0]
    assert b.trained_tokens == 1  # position 0 is never a target; 2 is masked; pads are masked
    assert make_blocks([], 8, packing=True, pad_id=0) == []
    assert make_blocks([], 8, packing=False, pad_id=0) == []


def test_blocks_from_real_tokens(tokenizer: Any) -> None:
    fmt = ChatFormat()
    examples = [tokenize(tokenizer, MESSAGES, fmt) for _ in range(3)]
    total = sum(len(ids) for ids, _ in examples)
    seq_len = 16
    pad = tokenizer.pad_token_id
    blocks = make_blocks(examples, seq_len, packing=True, pad_id=pad)
    expected = math.ceil(total / seq_len) - (1 if total % seq_len == 1 else 0)
    assert len(blocks) == expected
    text = tokenizer.decode([t for b in blocks for t in b.input_ids], skip_special_tokens=True)
    assert text.count("brodo di zirconio") == 3


def test_tokenize_keeps_the_rendered_text_with_a_sentencepiece_style_tokenizer() -> None:
    # Llama/Mistral tokenizers mark word starts with "▁"; tokenizing turn by turn would
    # add one before every "\n[|...|]" head. The whole rendered text must come back.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fmt = ChatFormat()
    convs = [
        [
            Message("user", "Che cos'è lo zirconio?"),
            Message("assistant", "Lo zirconio è un metallo."),
        ],
        [Message("user", "Grazie mille!"), Message("assistant", "Prego, a presto.")],
    ]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", fmt.user_tag, fmt.assistant_tag]
    raw.train_from_iterator(
        [fmt.render(c) for c in convs] * 3,
        trainers.BpeTrainer(vocab_size=200, special_tokens=specials),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    for conv in convs:
        ids, labels = tokenize(tok, conv, fmt, loss_on="assistant")
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == fmt.render(conv)
        learned = [t for t, lab in zip(ids[:-1], labels[:-1], strict=True) if lab != IGNORE_INDEX]
        assert tok.decode(learned).strip() == conv[1].text
