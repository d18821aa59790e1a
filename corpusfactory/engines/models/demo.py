"""The demo models: a tiny generator and a tiny scorer, trained here on the seed set.

The pipeline needs a causal LM to generate turns and a masked LM to score them.
Without any model hub, ``build_demo_models`` makes both from the built-in Italian
seed conversations in a couple of minutes on a laptop CPU:

* tokenizers trained on the seed text only: for the generator a SentencePiece BPE
  model (``tokenizer.model``, trained with ``sentencepiece``: byte fallback, the chat
  role tags as user-defined pieces that are never split), read by transformers as a
  ``LlamaTokenizer``; for the scorer a cased WordPiece (``tokenizers`` library). The
  generator's tokenizer is SentencePiece so that llama.cpp's maintained converter
  (``serving.gguf.convert``) builds it as it builds Llama, Mistral and Gemma
  checkpoints, and llama.cpp then tokenizes exactly as transformers does;
* ``generator``: a small ``LlamaForCausalLM`` trained on the seed conversations in
  the chat format (``[|Umano|]`` / ``[|Assistente|]``), one ``</s>`` after each;
* ``scorer``: a small ``BertForMaskedLM`` trained with standard 15% masking on the
  seed messages and sentences.

They are toys: they imitate the seed set and nothing else. Use them to run and
test the pipeline end to end; point the settings at real models for real corpora.

The build is deterministic (fixed seeds, a fixed number of steps) and cached in
``<models_dir>/<key>`` where ``models_dir`` defaults to
``$CORPUSFACTORY_CACHE/models`` (``~/.cache/corpusfactory/models``) and ``key``
hashes the seed file, ``BUILDER_VERSION`` and the hyper-parameters. A build happens
in a temporary directory that is renamed into place once complete, with a marker
file written last, so an interrupted build is redone and a finished one is reused
at once. A file lock keeps concurrent processes from building the same key twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpusfactory.cache import MARKER, cached_build, models_root
from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.errors import ModelError

log = logging.getLogger(__name__)

# Bump whenever the build changes in a way the hyper-parameters do not show.
# 3: the generator's tokenizer is a SentencePiece BPE model (was a byte-level BPE).
BUILDER_VERSION = "3"

DEMO_PREFIX = "demo:"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# Characters the scorer's WordPiece vocabulary always holds, alone and as "##x"
# continuations, so ordinary Italian text outside the seeds rarely becomes [UNK].
_SCORER_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "àèéìíîòóùúÀÈÉÌÍÒÓÙÚçÇñÑäöüÄÖÜß"
    ".,;:!?'\"()[]{}-_/\\@#%&*+=<>|~^`$€£°§«»“”‘’–—…"
)


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


@dataclass(frozen=True)
class DemoModels:
    """Where the built demo models are: two directories loadable with Auto* classes."""

    generator: Path
    scorer: Path
    root: Path
    key: str


# -- paths and keys ---------------------------------------------------------------


def default_seed_file() -> Path:
    """The built-in Italian seed set."""
    from corpusfactory.seeds import builtin_seed_path

    return builtin_seed_path()


def default_models_dir() -> Path:
    """``$CORPUSFACTORY_CACHE/models``, by default ``~/.cache/corpusfactory/models``."""
    return models_root()


def _scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def _hparams(steps_scale: float) -> tuple[GeneratorHParams, ScorerHParams]:
    if not steps_scale > 0:
        raise ValueError("steps_scale must be positive")
    gen, sco = GeneratorHParams(), ScorerHParams()
    gen = dataclasses.replace(gen, steps=_scaled(gen.steps, steps_scale))
    sco = dataclasses.replace(sco, steps=_scaled(sco.steps, steps_scale))
    return gen, sco


def build_key(seed_bytes: bytes, gen: GeneratorHParams, sco: ScorerHParams) -> str:
    """sha256 over the seed file, BUILDER_VERSION and the hyper-parameters, first 16 hex."""
    h = hashlib.sha256()
    h.update(seed_bytes)
    h.update(b"\0" + BUILDER_VERSION.encode())
    params = {"generator": dataclasses.asdict(gen), "scorer": dataclasses.asdict(sco)}
    h.update(b"\0" + json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


# -- public API ---------------------------------------------------------------------


def cache_key(seed_file: Path | str | None = None, steps_scale: float = 1.0) -> str:
    """The cache key ``build_demo_models`` uses for this seed file and step scale."""
    seed_path = Path(seed_file) if seed_file is not None else default_seed_file()
    return build_key(_read_seed_bytes(seed_path), *_hparams(steps_scale))


def _read_seed_bytes(seed_path: Path) -> bytes:
    try:
        return seed_path.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"cannot read the seed file {seed_path} for the demo models: {exc}"
        ) from exc


def build_demo_models(
    models_dir: Path | str | None = None,
    force: bool = False,
    *,
    seed_file: Path | str | None = None,
    steps_scale: float = 1.0,
) -> DemoModels:
    """Build the demo models, or reuse the cached build; return their directories.

    ``models_dir`` defaults to ``default_models_dir()``; ``force`` rebuilds even if a
    complete build exists; ``seed_file`` defaults to the built-in seed set;
    ``steps_scale`` multiplies the training steps (tests use a small value for a fast,
    still deterministic build — a different scale is a different cache key).
    """
    seed_path = Path(seed_file) if seed_file is not None else default_seed_file()
    seed_bytes = _read_seed_bytes(seed_path)
    gen_hp, sco_hp = _hparams(steps_scale)
    key = build_key(seed_bytes, gen_hp, sco_hp)
    root = models_root(models_dir) / key
    result = DemoModels(generator=root / "generator", scorer=root / "scorer", root=root, key=key)
    cached_build(
        root,
        lambda tmp: _build_into(tmp, seed_path, seed_bytes, gen_hp, sco_hp, key),
        force=force,
    )
    return result


def resolve_model(name: str, models_dir: Path | str | None = None) -> str:
    """``demo:generator`` / ``demo:scorer`` -> the local directory (built if needed).

    Any other name (a path, a hub id) is returned unchanged.
    """
    if not name.startswith(DEMO_PREFIX):
        return name
    which = name[len(DEMO_PREFIX) :]
    if which not in ("generator", "scorer"):
        raise ModelError(f"unknown demo model {name!r}: use 'demo:generator' or 'demo:scorer'")
    models = build_demo_models(models_dir)
    return str(models.generator if which == "generator" else models.scorer)


# -- the build ----------------------------------------------------------------------


def _load_conversations(seed_path: Path) -> list[tuple[Message, ...]]:
    from corpusfactory.seeds import load_seeds

    convs = [tuple(s.messages) for s in load_seeds(seed_path)]
    convs = [c for c in convs if c]
    if not convs:
        raise ModelError(f"the seed file {seed_path} holds no conversation to train on")
    return convs


def _build_into(
    out: Path,
    seed_path: Path,
    seed_bytes: bytes,
    gen_hp: GeneratorHParams,
    sco_hp: ScorerHParams,
    key: str,
) -> None:
    started = time.perf_counter()
    convs = _load_conversations(seed_path)
    seed_hash = hashlib.sha256(seed_bytes).hexdigest()
    common = {
        "builder_version": BUILDER_VERSION,
        "key": key,
        "seed_file": str(seed_path),
        "seed_file_sha256": seed_hash,
        "seed_conversations": len(convs),
        "torch_version": torch.__version__,
    }
    log.info("building demo models %s from %d seed conversations", key, len(convs))
    # Each model seeds torch's global generator; leave the caller's state as it was.
    with torch.random.fork_rng(devices=[]):
        gen_stats = _build_generator(out / "generator", convs, gen_hp)
        sco_stats = _build_scorer(out / "scorer", convs, sco_hp)
    _write_manifest(out / "generator", common, gen_stats, gen_hp)
    _write_manifest(out / "scorer", common, sco_stats, sco_hp)
    total = time.perf_counter() - started
    (out / "manifest.json").write_text(
        json.dumps(
            {
                **common,
                "generator": gen_stats,
                "scorer": sco_stats,
                "build_seconds": round(total, 2),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (out / MARKER).write_text(f"{key}\n", encoding="utf-8")  # last: the build is whole
    log.info("demo models %s built in %.1f s", key, total)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bars while saving; restore after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_manifest(
    model_dir: Path, common: dict[str, Any], stats: dict[str, Any], hp: Any
) -> None:
    manifest = {**common, **stats, "hyperparameters": dataclasses.asdict(hp)}
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train(
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, warmup, steps))
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


def _message_texts(convs: Sequence[Sequence[Message]]) -> list[str]:
    return [" ".join(m.text.split()) for c in convs for m in c if m.text.strip()]


# -- generator ----------------------------------------------------------------------


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


def _build_generator(
    out: Path, convs: Sequence[Sequence[Message]], hp: GeneratorHParams
) -> dict[str, Any]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    fmt = ChatFormat()
    chat_tokenizer = _generator_tokenizer(_message_texts(convs), hp, fmt)
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
    final_loss, _ = _train(
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
    with _no_progress_bars():
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


# -- scorer -------------------------------------------------------------------------


def _scorer_tokenizer(texts: list[str], hp: ScorerHParams) -> Any:
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
    for text in _message_texts(convs):
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


def _masked_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy at the masked positions, the MLM head applied only there (cheaper)."""
    # base_model: the encoder of any *ForMaskedLM (BERT's .bert, RoFormer's .roformer)
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[
        0
    ]
    chosen = batch["labels"] != -100
    logits = model.cls(hidden[chosen])
    return torch.nn.functional.cross_entropy(logits, batch["labels"][chosen])


def _build_scorer(
    out: Path, convs: Sequence[Sequence[Message]], hp: ScorerHParams
) -> dict[str, Any]:
    from transformers import BertConfig, BertForMaskedLM

    started = time.perf_counter()
    texts = _message_texts(convs)
    tokenizer = _scorer_tokenizer(texts, hp)
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
    final_loss, _ = _train(
        model,
        _masked_lm_loss,
        _scorer_batches(encoded, tokenizer, hp),
        hp.steps,
        hp.lr,
        hp.warmup_steps,
        hp.weight_decay,
        "scorer",
    )
    out.mkdir(parents=True)
    with _no_progress_bars():
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
