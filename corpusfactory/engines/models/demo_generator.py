"""The toy generator of the demo models: a tiny Llama trained on the seed conversations.

``build_generator`` trains a SentencePiece BPE tokenizer for the chat format
(``train_chat_tokenizer``, carrying ``chat_template``) on the seed messages and a small
``LlamaForCausalLM`` on the rendered conversations, and saves both in one directory;
``demo.build_demo_models`` calls it and caches the result.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.engines.models.demo_training import message_texts, no_progress_bars, train
from corpusfactory.errors import ModelError


@dataclass(frozen=True)
class GeneratorHParams:
    """The generator's tokenizer, architecture and training schedule."""

    vocab_size: int = 3000  # an upper bound: SentencePiece stops when no merge is left
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim 64: vLLM supports it, not 16 or 32
    intermediate_size: int = 384
    max_positions: int = 512
    block_size: int = 512  # whole prompts (an example conversation + history) fit
    batch_size: int = 4
    # Two layers and more steps beat four layers and fewer in the same CPU time; ~320
    # steps reach a loss near 1.5 on the seeds: fluent-ish, not yet reciting them.
    steps: int = 320
    lr: float = 4e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 1234


def chat_template(fmt: ChatFormat | None = None) -> str:
    """A Jinja chat template that renders messages as ``ChatFormat`` does.

    Each user/assistant message becomes ``TAG text`` (text stripped), turns are joined
    by newlines, and ``add_generation_prompt`` appends a newline and the assistant tag
    (as ``ChatFormat.prompt`` does). Other roles (system) are skipped: the format has
    none. The generator's tokenizer carries it (``chat_template.jinja``), so
    transformers' ``apply_chat_template`` and the GGUF builds (llama.cpp's converter
    copies it into ``tokenizer.chat_template``) render the project's chat format.
    """
    fmt = fmt or ChatFormat()
    user, assistant = json.dumps(fmt.user_tag), json.dumps(fmt.assistant_tag)
    return (
        "{%- set ns = namespace(first=true) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] in ['user', 'assistant'] -%}"
        "{%- if not ns.first %}{{ '\\n' }}{% endif -%}"
        f"{{%- if message['role'] == 'user' %}}{{{{ {user} }}}}"
        f"{{%- else %}}{{{{ {assistant} }}}}{{%- endif -%}}"
        "{{ ' ' + (message['content'] | trim) }}"
        "{%- set ns.first = false -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if not ns.first %}{{ '\\n' }}{% endif -%}"
        f"{{{{ {assistant} }}}}"
        "{%- endif -%}"
    )


@dataclass(frozen=True)
class ChatTokenizer:
    """A SentencePiece model for the chat format and transformers' tokenizer read from it.

    ``model`` is the serialized SentencePiece model (``tokenizer.model``); ``hf`` the
    ``LlamaTokenizer`` transformers builds from it (BOS added, no EOS, no prefix space).
    """

    model: bytes
    hf: Any

    def save(self, out: Path) -> None:
        """Write a directory that transformers and llama.cpp's converter both read.

        ``save_pretrained`` writes ``tokenizer.json``, ``tokenizer_config.json`` and
        ``chat_template.jinja``; transformers 5 writes no ``tokenizer.model``, which the
        converter reads the vocabulary and merge scores from, so it is written here,
        with ``added_tokens.json`` naming the role tags: the converter marks the pieces
        it lists user-defined, which llama.cpp never splits (a user-defined piece of the
        SentencePiece model alone would become a normal token).
        """
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(out)
        (out / "tokenizer.model").write_bytes(self.model)
        tags = {
            tok.content: idx for idx, tok in self.hf.added_tokens_decoder.items() if not tok.special
        }
        (out / "added_tokens.json").write_text(
            json.dumps(tags, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8"
        )


def train_chat_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    fmt: ChatFormat | None = None,
    *,
    max_length: int = 512,
) -> ChatTokenizer:
    """Train a SentencePiece BPE tokenizer for the chat format on ``texts``.

    Byte fallback (no text is ever unknown); ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` at
    ids 0-3 and the role tags as user-defined pieces right after them (never split);
    no normalization and no dummy prefix, so that transformers (a ``Metaspace``
    pre-tokenizer that never prepends) and llama.cpp (``add_space_prefix`` false, read
    from ``add_prefix_space`` by the converter) split every text alike, text after a
    role tag included. ``vocab_size`` is an upper bound: a small corpus gives fewer
    pieces. Deterministic: one trainer thread, the texts in their order.
    """
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    fmt = fmt or ChatFormat()
    if not texts:
        raise ModelError("no text to train the generator's tokenizer on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            user_defined_symbols=[fmt.user_tag, fmt.assistant_tag],
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            max_sentence_length=1 << 16,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
            # The special pieces as Llama lays them out, plus a padding piece.
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
        )
    except RuntimeError as exc:
        raise ModelError(f"cannot train the generator's SentencePiece tokenizer: {exc}") from exc
    model = buf.getvalue()
    # transformers builds its tokenizer from a tokenizer.model in a directory.
    with tempfile.TemporaryDirectory(prefix="spm-") as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model)
        hf = LlamaTokenizer.from_pretrained(
            tmp,
            add_prefix_space=False,
            legacy=False,
            add_bos_token=True,
            add_eos_token=False,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            model_max_length=max_length,
            clean_up_tokenization_spaces=False,
        )
    # The conversion lists every piece but <unk> as an extra special token; the role tags
    # are plain added tokens (kept when decoding with skip_special_tokens), as before.
    hf.extra_special_tokens = []
    for key in ("is_local", "local_files_only"):  # about the temporary directory
        hf.init_kwargs.pop(key, None)
    hf.chat_template = chat_template(fmt)
    for tag in (fmt.user_tag, fmt.assistant_tag):
        if len(hf(tag, add_special_tokens=False)["input_ids"]) != 1:
            raise ModelError(f"the generator's tokenizer splits the role tag {tag!r}")
    return ChatTokenizer(model=model, hf=hf)


def _generator_tokenizer(texts: list[str], hp: GeneratorHParams, fmt: ChatFormat) -> ChatTokenizer:
    return train_chat_tokenizer(texts, hp.vocab_size, fmt, max_length=hp.max_positions)


def _generator_stream(
    convs: Sequence[Sequence[Message]], tokenizer: Any, fmt: ChatFormat, seed: int
) -> torch.Tensor:
    """One token stream: every conversation alone, and once more after another one.

    The second form is how producers prompt (an example conversation, a blank line,
    then the conversation going on), so the model sees that layout in training.
    """
    rng = torch.Generator().manual_seed(seed)
    rendered = [fmt.render(c) for c in convs]
    docs = list(rendered)
    if len(rendered) > 1:
        for i, text in enumerate(rendered):
            j = int(torch.randint(len(rendered) - 1, (1,), generator=rng))
            j = j + 1 if j >= i else j
            docs.append(f"{rendered[j]}\n\n{text}")
    order = torch.randperm(len(docs), generator=rng).tolist()
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for k in order:
        ids.extend(tokenizer(docs[k], add_special_tokens=True, verbose=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _generator_batches(
    stream: torch.Tensor, hp: GeneratorHParams
) -> Iterator[dict[str, torch.Tensor]]:
    rng = torch.Generator().manual_seed(hp.seed + 1)
    block = min(hp.block_size, len(stream))
    span = len(stream) - block + 1
    offsets = torch.arange(block)
    while True:
        starts = torch.randint(span, (hp.batch_size, 1), generator=rng)
        x = stream[starts + offsets]
        yield {"input_ids": x, "labels": x}


def build_generator(
    out: Path, convs: Sequence[Sequence[Message]], hp: GeneratorHParams
) -> dict[str, Any]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    fmt = ChatFormat()
    chat_tokenizer = _generator_tokenizer(message_texts(convs), hp, fmt)
    tokenizer = chat_tokenizer.hf
    stream = _generator_stream(convs, tokenizer, fmt, hp.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hp.hidden_size,
        intermediate_size=hp.intermediate_size,
        num_hidden_layers=hp.num_layers,
        num_attention_heads=hp.num_heads,
        num_key_value_heads=hp.num_heads,
        head_dim=hp.hidden_size // hp.num_heads,
        max_position_embeddings=hp.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(hp.seed)
    model = LlamaForCausalLM(config)
    final_loss, _ = train(
        model,
        lambda m, batch: m(**batch).loss,
        _generator_batches(stream, hp),
        hp.steps,
        hp.lr,
        hp.warmup_steps,
        hp.weight_decay,
        "generator",
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.9,
        top_p=0.95,
        max_new_tokens=64,
    )
    out.mkdir(parents=True)
    with no_progress_bars():
        model.save_pretrained(out)
    chat_tokenizer.save(out)
    return {
        "model": "generator",
        "architecture": "LlamaForCausalLM",
        "description": "Tiny causal LM trained on the seed conversations in the chat format.",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "training_tokens": len(stream),
        "steps": hp.steps,
        "final_loss": round(final_loss, 4),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
