"""Generic evaluation metrics: SQuAD answer scoring, classification, text and tag-list scores.

Each metric is written from its definition:

* **SQuAD v1.1** (``normalize_answer``, ``exact_match``, ``f1``, ``squad_scores``). An answer is
  normalised by lower-casing, removing ``string.punctuation``, removing the English articles
  *a/an/the* as whole words and collapsing whitespace. Exact match (EM) is 1.0 when the normalised
  prediction equals a normalised gold answer. F1 is the harmonic mean of token precision and
  recall over the multiset of normalised tokens; as in the official v1.1 script it is 0.0 whenever
  the two sides share no token (so two empty answers have F1 0.0 but EM 1.0). Both take the
  maximum over the gold answers; ``squad_scores`` averages them as percentages.
* **SQuAD-it** (``normalize_answer_it``): the same, also removing the Italian articles and
  articulated prepositions, whole or elided (``l'acqua`` -> ``acqua``).
* **Classification** (``classification_scores``): accuracy, per-label precision / recall / F1 /
  support and their unweighted (macro) means.
* **Text similarity** (``cosine_similarity_texts``): cosine of sentence embeddings, pair by pair.
* **Tag lists** (``tag_set_metrics``): IoU, intersection over truth, intersection over model and
  the normalised Levenshtein distance between the sorted tag sets.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

# ---------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_EN_ARTICLES = re.compile(r"\b(a|an|the)\b")

_IT_ARTICLES = (
    *("il", "lo", "la", "i", "gli", "le", "un", "uno", "una"),
    *("del", "dello", "della", "dei", "degli", "delle"),
    *("al", "allo", "alla", "ai", "agli", "alle"),
    *("dal", "dallo", "dalla", "dai", "dagli", "dalle"),
    *("nel", "nello", "nella", "nei", "negli", "nelle"),
    *("sul", "sullo", "sulla", "sui", "sugli", "sulle"),
)
_IT_WORDS = re.compile(r"\b(" + "|".join(_IT_ARTICLES) + r")\b")
# Elided forms must go before punctuation is stripped: without the apostrophe "l'acqua" would
# become the single token "lacqua". The typographic apostrophe (U+2019) is common in Italian text
# and is not in string.punctuation, so it is matched here too.
_IT_ELIDED = re.compile(r"\b(l|un|dell|all|dall|nell|sull)['\u2019]")


def _remove_punctuation(s: str) -> str:
    return "".join(ch for ch in s if ch not in _PUNCTUATION)


def _collapse_whitespace(s: str) -> str:
    return " ".join(s.split())


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = _remove_punctuation(s.lower())
    s = _EN_ARTICLES.sub(" ", s)
    return _collapse_whitespace(s)


def normalize_answer_it(s: str) -> str:
    """``normalize_answer`` that also drops Italian articles and articulated prepositions.

    The English articles are still removed, so English answers inside SQuAD-it score as before.
    """
    s = _IT_ELIDED.sub(" ", s.lower())
    s = _remove_punctuation(s)
    s = _EN_ARTICLES.sub(" ", s)
    s = _IT_WORDS.sub(" ", s)
    return _collapse_whitespace(s)


def _em_one(prediction: str, gold: str, italian: bool) -> float:
    norm = normalize_answer_it if italian else normalize_answer
    return 1.0 if norm(prediction) == norm(gold) else 0.0


def _f1_one(prediction: str, gold: str, italian: bool) -> float:
    norm = normalize_answer_it if italian else normalize_answer
    pred_tokens = norm(prediction).split()
    gold_tokens = norm(gold).split()
    # Multiset intersection: a token repeated in both sides counts as often as its smaller count.
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    # Official v1.1 behaviour: no shared token (including two empty answers) is F1 0.
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: Sequence[str], italian: bool = False) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0.

    No gold answers gives 0.0 (nothing can be matched).
    """
    return max((_em_one(prediction, a, italian) for a in answers), default=0.0)


def f1(prediction: str, answers: Sequence[str], italian: bool = False) -> float:
    """Best token-level F1 of the prediction against the gold answers (0.0 if there are none)."""
    return max((_f1_one(prediction, a, italian) for a in answers), default=0.0)


def squad_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    italian: bool = False,
) -> dict[str, Any]:
    """EM and F1 as percentages over every question in ``references``.

    Like the official script, a question with no prediction scores 0 (its id count is reported
    as ``missing``) and predictions for unknown ids are ignored. No questions gives 0.0.
    Returns ``{"em": float, "f1": float, "n": int, "missing": int}``.
    """
    em_total = 0.0
    f1_total = 0.0
    missing = 0
    for qid, answers in references.items():
        if qid not in predictions:
            missing += 1
            continue
        em_total += exact_match(predictions[qid], answers, italian)
        f1_total += f1(predictions[qid], answers, italian)
    n = len(references)
    return {
        "em": 100.0 * em_total / n if n else 0.0,
        "f1": 100.0 * f1_total / n if n else 0.0,
        "n": n,
        "missing": missing,
    }


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_scores(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, per-label precision / recall / F1 / support and their macro means.

    ``labels`` defaults to the sorted set of ``y_true``. Conventions:

    * a predicted label outside ``labels`` is a false negative for the true class and a false
      positive for no class, i.e. it is simply wrong for every class;
    * a zero denominator gives 0.0: the precision of a never-predicted class, the recall of a
      class with no support, and F1 when precision + recall is 0;
    * macro scores are unweighted means over ``labels`` (0.0 when there are none); accuracy is
      over all samples (0.0 when there are none).

    Returns ``{"accuracy", "macro_precision", "macro_recall", "macro_f1", "n",
    "per_label": {label: {"precision", "recall", "f1", "support"}}}``.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    label_list = list(labels) if labels is not None else sorted(set(y_true))
    pairs = list(zip(y_true, y_pred, strict=True))
    per_label: dict[str, dict[str, float | int]] = {}
    for label in label_list:
        tp = sum(1 for t, p in pairs if t == label and p == label)
        predicted = sum(1 for _, p in pairs if p == label)
        support = sum(1 for t, _ in pairs if t == label)
        precision = _safe_div(tp, predicted)
        recall = _safe_div(tp, support)
        per_label[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _safe_div(2 * precision * recall, precision + recall),
            "support": support,
        }
    correct = sum(1 for t, p in pairs if t == p)
    k = len(label_list)
    return {
        "accuracy": _safe_div(correct, len(pairs)),
        "macro_precision": _safe_div(sum(s["precision"] for s in per_label.values()), k),
        "macro_recall": _safe_div(sum(s["recall"] for s in per_label.values()), k),
        "macro_f1": _safe_div(sum(s["f1"] for s in per_label.values()), k),
        "n": len(pairs),
        "per_label": per_label,
    }


# ---------------------------------------------------------------------------------------------
# Text similarity
# ---------------------------------------------------------------------------------------------


class TextEncoder(Protocol):
    """What ``cosine_similarity_texts`` needs (``corpusfactory.engines.embedder.Embedder`` fits)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


def cosine_similarity_texts(
    generated: list[str], references: list[str], embedder: TextEncoder
) -> list[float]:
    """Cosine similarity of each generated text with the reference at the same position."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated texts but {len(references)} references")
    if not generated:
        return []
    a = np.asarray(embedder.encode(list(generated)), dtype=np.float64)
    b = np.asarray(embedder.encode(list(references)), dtype=np.float64)
    # The project's embedder returns unit rows already; normalising again keeps the result a
    # cosine for any encoder. A zero vector has no direction, so its similarity is 0.
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    sims = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return [float(x) for x in sims]


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values, matching the other metrics' empty convention."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


# ---------------------------------------------------------------------------------------------
# Tag lists
# ---------------------------------------------------------------------------------------------


def _tag_set(tags: Iterable[str]) -> set[str]:
    # Tags compare case- and padding-insensitively; a tag that is blank after strip() is no tag.
    return {t for t in (tag.strip().lower() for tag in tags) if t}


def _levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Edit distance between two sequences of whole items (insert / delete / substitute cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def tag_set_metrics(predicted: Iterable[str], truth: Iterable[str]) -> dict[str, float]:
    """Overlap of a predicted tag list with the true one, both taken as sets.

    * ``iou`` = |P∩T| / |P∪T|;
    * ``intersection_over_truth`` = |P∩T| / |T| (recall-like);
    * ``intersection_over_model`` = |P∩T| / |P| (precision-like);
    * ``normalized_levenshtein`` = edit distance between the sorted tag lists, each tag one
      symbol, divided by the longer length (0.0 = identical, 1.0 = nothing in common).

    Empty denominators: a ratio is 1.0 when both sets are empty (perfect agreement) and 0.0
    when only one is; the Levenshtein score of two empty sets is 0.0.
    """
    p = _tag_set(predicted)
    t = _tag_set(truth)
    both_empty = 1.0 if not p and not t else 0.0
    inter = len(p & t)

    def ratio(den: int) -> float:
        return inter / den if den else both_empty

    longest = max(len(p), len(t))
    distance = _levenshtein(sorted(p), sorted(t))
    return {
        "iou": ratio(len(p | t)),
        "intersection_over_truth": ratio(len(t)),
        "intersection_over_model": ratio(len(p)),
        "normalized_levenshtein": distance / longest if longest else 0.0,
    }
