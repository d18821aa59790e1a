"""The demo's Italian scorer: a small masked LM trained on real Italian text.

The toy ``demo:scorer`` (``corpusfactory.engines.models.demo``) knows only the seed set's
ten thousand words, so its NLL says "sounds like the seeds" rather than "sounds like
Italian". No Italian BERT can be had offline, so ``build_italian_scorer`` trains one
here, on CPU, from the one sizeable body of real Italian text the project ships: the
contexts (Wikipedia paragraphs translated into Italian) of the SQuAD-it test set in
``corpusfactory/data/squad-it/`` (CC BY-SA 4.0, see its README).

* Held-out split: whole articles, chosen by a stable hash of their title
  (``is_heldout_article``: about one article in four, 13 of the 48). Their contexts
  are never trained on; a context text that also appears under a held-out article is
  dropped from training too. The demo's SQuAD-it evaluation should draw its items from
  the held-out articles only, and tests score held-out sentences.
* Training units: every sentence of every training context (split like
  ``MLMScorer``'s sentence granularity, at least ``min_words`` words), and every pair
  of consecutive sentences, so the model sees one- and two-sentence texts like chat
  turns.
* Tokenizer: a cased WordPiece trained on the training sentences with the demo
  scorer's deterministic recipe (``demo_scorer.scorer_tokenizer``).
* Model: a ``RoFormerForMaskedLM`` — BERT with rotary position encodings — of 3
  layers, hidden size 128 (1.16 M parameters), trained with BERT's masking scheme
  (80% [MASK], 10% random, 10% kept) at a 30% masking rate on length-bucketed batches
  of about ``batch_tokens`` tokens, a fixed number of steps with fixed seeds and two
  torch threads, so the build is deterministic; the weights are float32. Measured
  choices, all within the same CPU budget: a plain ``BertForMaskedLM`` (absolute
  learned positions) stays on the unigram plateau for the whole budget (held-out
  loss 6.5 at a 4,000-token vocabulary, where the unigram entropy is 7.0), while
  rotary positions leave it within a few hundred steps; 30% masking beat 15% at equal
  steps; a higher learning rate (5e-3) fell back to the plateau; bfloat16 autocast is
  much slower on a CPU without AVX512-BF16/AMX (this project's runners have AVX2).
  ``MLMScorer`` loads it through the Auto classes and uses its ``cls`` head.

The result is cached in ``<models_dir>/italian-scorer-<key>`` (``models_dir`` defaults
to ``$CORPUSFACTORY_CACHE/models``), ``key`` hashing the source file,
``BUILDER_VERSION`` and the hyper-parameters; it is built in a temporary directory
renamed into place, with a marker written last and a file lock around the build (the
discipline of ``demo.py``). The model directory carries a ``README.md`` with the
source, its attribution and the licence: the weights and the vocabulary derive from
CC BY-SA 4.0 text, so the model is distributed under CC BY-SA 4.0 too.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpusfactory.cache import MARKER, cached_build, models_root
from corpusfactory.engines.models.demo_scorer import ScorerHParams, scorer_tokenizer
from corpusfactory.engines.models.demo_training import masked_lm_loss, no_progress_bars, schedule
from corpusfactory.errors import ModelError
from corpusfactory.text import split_sentences

log = logging.getLogger(__name__)

# Bump whenever the build changes in a way the hyper-parameters do not show.
BUILDER_VERSION = "1"

MODEL_NAME = "demo:italian-scorer"
DIR_PREFIX = "italian-scorer-"

# Held-out articles: sha256(_HELDOUT_SALT + title) read as an integer, modulo this, is 0.
HELDOUT_MODULUS = 4
_HELDOUT_SALT = b"corpusfactory:italian-scorer:heldout\0"

LICENCE = "CC BY-SA 4.0"
LICENCE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
SOURCE_NAME = "SQuAD-it test set (contexts)"
ATTRIBUTION = (
    "SQuAD-it by Danilo Croce, Alexandra Zelenanska and Roberto Basili "
    '("Neural Learning for Question Answering in Italian", AI*IA 2018), '
    "a semi-automatic Italian translation of SQuAD v1.1 (Rajpurkar et al.), whose "
    "paragraphs come from English Wikipedia; CC BY-SA 4.0"
)

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


@dataclass(frozen=True)
class Article:
    """One SQuAD-it article: its title and its distinct contexts, in file order."""

    title: str
    contexts: tuple[str, ...]


# -- source and split ---------------------------------------------------------------


def default_source() -> Path:
    """The SQuAD-it test set shipped in ``corpusfactory/data/squad-it/``."""
    from corpusfactory.settings import SQUAD_IT_SHIPPED

    return SQUAD_IT_SHIPPED


def is_heldout_article(title: str) -> bool:
    """True for the SQuAD-it articles the Italian scorer never trains on.

    A stable rule that depends on the title alone (not on the other articles, the
    settings or the Python version): the first 8 bytes of
    ``sha256(b"corpusfactory:italian-scorer:heldout\\0" + title.encode("utf-8"))``,
    big-endian, modulo ``HELDOUT_MODULUS`` (4) equal 0. In the shipped file that is
    13 of the 48 articles. Draw evaluation items from these articles only.
    """
    digest = hashlib.sha256(_HELDOUT_SALT + title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def _clean(text: str) -> str:
    return " ".join(text.split())


def load_articles(source: Path | str | None = None) -> list[Article]:
    """The articles of a SQuAD v1.1 file (``.json`` or ``.json.gz``) with their contexts.

    Whitespace inside contexts is collapsed; a context repeated within an article is
    kept once. ModelError if the file cannot be read or is not SQuAD JSON.
    """
    path = Path(source) if source is not None else default_source()
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        data = json.loads(raw.decode("utf-8"))
        articles = []
        for article in data["data"]:
            seen: dict[str, None] = {}
            for para in article["paragraphs"]:
                seen.setdefault(_clean(str(para["context"])), None)
            articles.append(Article(str(article["title"]), tuple(c for c in seen if c)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot read SQuAD-it contexts from {path}: {exc}") from exc
    if not articles:
        raise ModelError(f"{path} holds no SQuAD-it article")
    return articles


def split_articles(articles: Sequence[Article]) -> tuple[list[Article], list[Article]]:
    """(training, held-out) articles. A training article loses every context that is
    also a context of a held-out article, so no held-out text is ever trained on."""
    heldout = [a for a in articles if is_heldout_article(a.title)]
    banned = {c for a in heldout for c in a.contexts}
    training = []
    for a in articles:
        if not is_heldout_article(a.title):
            training.append(Article(a.title, tuple(c for c in a.contexts if c not in banned)))
    return training, heldout


def article_sentences(articles: Sequence[Article], min_words: int = 4) -> list[list[str]]:
    """Per context, its sentences (``split_sentences``) of at least ``min_words`` words."""
    out = []
    for a in articles:
        for context in a.contexts:
            out.append([s for s in split_sentences(context) if len(s.split()) >= min_words])
    return out


def heldout_sentences(source: Path | str | None = None, min_words: int = 4) -> list[str]:
    """Every sentence of the held-out articles, in file order (for tests and checks)."""
    _, heldout = split_articles(load_articles(source))
    return [s for ctx in article_sentences(heldout, min_words) for s in ctx]


def _training_units(training: Sequence[Article], min_words: int) -> list[str]:
    """Each sentence, then each pair of consecutive sentences of a context."""
    units: list[str] = []
    for sentences in article_sentences(training, min_words):
        units.extend(sentences)
        units.extend(f"{a} {b}" for a, b in itertools.pairwise(sentences))
    return units


# -- keys and the public API --------------------------------------------------------


def _hparams(steps_scale: float) -> ItalianScorerHParams:
    if not steps_scale > 0:
        raise ValueError("steps_scale must be positive")
    hp = ItalianScorerHParams()
    return dataclasses.replace(hp, steps=max(1, round(hp.steps * steps_scale)))


def _read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path} for the Italian scorer: {exc}") from exc


def build_key(source_bytes: bytes, hp: ItalianScorerHParams) -> str:
    """sha256 over the source file, BUILDER_VERSION, the held-out rule and the
    hyper-parameters, first 16 hex digits."""
    h = hashlib.sha256()
    h.update(source_bytes)
    h.update(b"\0" + BUILDER_VERSION.encode())
    h.update(b"\0" + _HELDOUT_SALT + str(HELDOUT_MODULUS).encode())
    h.update(b"\0" + json.dumps(dataclasses.asdict(hp), sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_key(source: Path | str | None = None, steps_scale: float = 1.0) -> str:
    """The cache key ``build_italian_scorer`` uses for this source and step scale."""
    path = Path(source) if source is not None else default_source()
    return build_key(_read_source(path), _hparams(steps_scale))


def build_italian_scorer(
    models_dir: Path | str | None = None,
    progress: Progress | None = None,
    *,
    force: bool = False,
    source: Path | str | None = None,
    steps_scale: float = 1.0,
) -> Path:
    """Build the Italian scorer, or reuse the cached build; return its directory.

    The directory loads with ``AutoTokenizer``/``AutoModelForMaskedLM`` and with
    ``MLMScorer``. ``models_dir`` defaults to ``<cache>/models``; ``progress``
    receives a line now and then during a build (nothing when the cache is used);
    ``force`` rebuilds; ``source`` defaults to the shipped SQuAD-it file;
    ``steps_scale`` multiplies the training steps (tests use a small value for a fast,
    still deterministic build — a different scale is a different cache key).
    """
    path = Path(source) if source is not None else default_source()
    source_bytes = _read_source(path)
    hp = _hparams(steps_scale)
    key = build_key(source_bytes, hp)
    root = models_root(models_dir) / f"{DIR_PREFIX}{key}"
    return cached_build(
        root,
        lambda tmp: _build_into(tmp, path, source_bytes, hp, key, progress),
        force=force,
    )


# -- the build ----------------------------------------------------------------------


def _batches(
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
            yield _masked(batch, encoded, normal_ids, pad, mask, hp.mask_prob, gen)


def _masked(
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


def _encode(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids with [CLS]/[SEP]; a unit longer than ``max_len`` keeps its head and [SEP]."""
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]:
        out.append(ids[: max_len - 1] + ids[-1:] if len(ids) > max_len else list(ids))
    return out


def _train(
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
def _heldout_loss(
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
        batch = _masked(order[start : start + 64], encoded, normal_ids, pad, mask, 0.15, gen)
        n = int((batch["labels"] != -100).sum())
        total += float(masked_lm_loss(model, batch)) * n
        count += n
    return total / max(1, count)


def _words_and_chars(texts: Sequence[str]) -> tuple[int, int]:
    return sum(len(t.split()) for t in texts), sum(len(t) for t in texts)


def _build_into(
    out: Path,
    source: Path,
    source_bytes: bytes,
    hp: ItalianScorerHParams,
    key: str,
    progress: Progress | None,
) -> None:
    from transformers import RoFormerConfig, RoFormerForMaskedLM

    def say(line: str) -> None:
        log.info("%s", line)
        if progress is not None:
            progress(line)

    started = time.perf_counter()
    training, heldout = split_articles(load_articles(source))
    train_contexts = [c for a in training for c in a.contexts]
    heldout_contexts = [c for a in heldout for c in a.contexts]
    train_sentences = [s for ctx in article_sentences(training, hp.min_words) for s in ctx]
    held_sentences = [s for ctx in article_sentences(heldout, hp.min_words) for s in ctx]
    if not train_sentences or not held_sentences:
        raise ModelError(f"{source}: too little text to train and check the Italian scorer")
    units = _training_units(training, hp.min_words)
    train_words, train_chars = _words_and_chars(train_contexts)
    say(
        f"building the Italian scorer {key} from {len(training)} SQuAD-it articles "
        f"({train_words} words; {len(heldout)} articles held out), {hp.steps} steps"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(hp.threads)
    try:
        # Seed torch's global generator for the initial weights; leave the caller's state.
        with torch.random.fork_rng(devices=[]):
            tok_hp = ScorerHParams(
                vocab_size=hp.vocab_size,
                min_frequency=hp.min_frequency,
                max_positions=hp.max_positions,
            )
            tokenizer = scorer_tokenizer(train_sentences, tok_hp)
            encoded = _encode(tokenizer, units, hp.max_len)
            config = RoFormerConfig(
                vocab_size=len(tokenizer),
                embedding_size=hp.hidden_size,
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
            model = RoFormerForMaskedLM(config)
            final_loss, tokens = _train(model, _batches(encoded, tokenizer, hp), hp, say)
            held_loss = _heldout_loss(
                model, _encode(tokenizer, held_sentences, hp.max_len), tokenizer, hp
            )
        model.float()
        with no_progress_bars():
            model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        torch.set_num_threads(threads)
    held_words, held_chars = _words_and_chars(heldout_contexts)
    seconds = round(time.perf_counter() - started, 2)
    manifest = {
        "model": MODEL_NAME,
        "architecture": "RoFormerForMaskedLM",
        "description": "Small masked LM trained with 30% masking on real Italian text "
        "(the SQuAD-it contexts of the articles the demo does not evaluate on).",
        "builder_version": BUILDER_VERSION,
        "key": key,
        "source": SOURCE_NAME,
        "source_file": str(source),
        "source_sha256": hashlib.sha256(source_bytes).hexdigest(),
        "licence": LICENCE,
        "licence_url": LICENCE_URL,
        "attribution": ATTRIBUTION,
        "heldout_rule": "sha256(b'corpusfactory:italian-scorer:heldout\\0' + title)[:8] "
        f"big-endian % {HELDOUT_MODULUS} == 0",
        "heldout_articles": [a.title for a in heldout],
        "training_articles": len(training),
        "training_contexts": len(train_contexts),
        "training_words": train_words,
        "training_characters": train_chars,
        "training_sentences": len(train_sentences),
        "training_units": len(units),
        "heldout_contexts": len(heldout_contexts),
        "heldout_words": held_words,
        "heldout_characters": held_chars,
        "heldout_sentences": len(held_sentences),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": hp.steps,
        "training_tokens_seen": tokens,
        "final_loss": round(final_loss, 4),
        "heldout_mlm_loss": round(held_loss, 4),
        "torch_version": torch.__version__,
        "build_seconds": seconds,
        "hyperparameters": dataclasses.asdict(hp),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_model_readme(manifest), encoding="utf-8")
    (out / MARKER).write_text(f"{key}\n", encoding="utf-8")  # last: the build is whole
    say(
        f"Italian scorer {key} built in {seconds:.0f} s: loss {final_loss:.3f}, "
        f"held-out loss {held_loss:.3f}"
    )


def _model_readme(m: dict[str, Any]) -> str:
    return (
        "# corpusfactory's Italian scorer (demo)\n\n"
        f"A small RoFormerForMaskedLM (BERT with rotary positions; {m['parameters']:,} "
        f"parameters, WordPiece vocabulary of {m['vocab_size']:,}) trained by corpusfactory "
        f"({__name__}) with 30% masking on "
        f"{m['training_words']:,} words ({m['training_characters']:,} characters) of the "
        f"{SOURCE_NAME}, {m['training_articles']} articles; the "
        f"{len(m['heldout_articles'])} held-out articles were not trained on.\n\n"
        f"Source: {ATTRIBUTION}.\n\n"
        f"Licence: the model (weights and vocabulary) derives from that text and is "
        f"distributed under the same licence, {LICENCE} ({LICENCE_URL}).\n"
    )
