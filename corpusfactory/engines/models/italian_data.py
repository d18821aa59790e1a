"""The Italian scorer's source text: the articles of the SQuAD-it file, the held-out split
(whole articles, by a stable hash of the title), their sentences and the training units
(each sentence and each pair of consecutive sentences)."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corpusfactory.errors import ModelError
from corpusfactory.text import split_sentences

# Held-out articles: sha256(HELDOUT_SALT + title) read as an integer, modulo this, is 0.
HELDOUT_MODULUS = 4
HELDOUT_SALT = b"corpusfactory:italian-scorer:heldout\0"


@dataclass(frozen=True)
class Article:
    """One SQuAD-it article: its title and its distinct contexts, in file order."""

    title: str
    contexts: tuple[str, ...]


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
    digest = hashlib.sha256(HELDOUT_SALT + title.encode("utf-8")).digest()
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


def training_units(training: Sequence[Article], min_words: int) -> list[str]:
    """Each sentence, then each pair of consecutive sentences of a context."""
    units: list[str] = []
    for sentences in article_sentences(training, min_words):
        units.extend(sentences)
        units.extend(f"{a} {b}" for a, b in itertools.pairwise(sentences))
    return units
