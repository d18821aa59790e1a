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

This module holds the cache key, the public API and the build's assembly;
``italian_data`` reads the source and splits it, ``italian_training`` trains the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from corpusfactory.cache import MARKER, cached_build, models_root
from corpusfactory.engines.models.demo_scorer import ScorerHParams, scorer_tokenizer
from corpusfactory.engines.models.demo_training import no_progress_bars
from corpusfactory.engines.models.italian_data import (
    HELDOUT_MODULUS,
    HELDOUT_SALT,
    article_sentences,
    default_source,
    load_articles,
    split_articles,
    training_units,
)
from corpusfactory.engines.models.italian_training import (
    ItalianScorerHParams,
    Progress,
    encode_units,
    heldout_mlm_loss,
    masked_batches,
    train_mlm,
)
from corpusfactory.errors import ModelError

log = logging.getLogger(__name__)

# Bump whenever the build changes in a way the hyper-parameters do not show.
BUILDER_VERSION = "1"

MODEL_NAME = "demo:italian-scorer"
DIR_PREFIX = "italian-scorer-"

LICENCE = "CC BY-SA 4.0"
LICENCE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
SOURCE_NAME = "SQuAD-it test set (contexts)"
ATTRIBUTION = (
    "SQuAD-it by Danilo Croce, Alexandra Zelenanska and Roberto Basili "
    '("Neural Learning for Question Answering in Italian", AI*IA 2018), '
    "a semi-automatic Italian translation of SQuAD v1.1 (Rajpurkar et al.), whose "
    "paragraphs come from English Wikipedia; CC BY-SA 4.0"
)


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
    h.update(b"\0" + HELDOUT_SALT + str(HELDOUT_MODULUS).encode())
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
    units = training_units(training, hp.min_words)
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
            encoded = encode_units(tokenizer, units, hp.max_len)
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
            final_loss, tokens = train_mlm(model, masked_batches(encoded, tokenizer, hp), hp, say)
            held_loss = heldout_mlm_loss(
                model, encode_units(tokenizer, held_sentences, hp.max_len), tokenizer, hp
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
