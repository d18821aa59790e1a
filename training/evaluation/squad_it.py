"""SQuAD-it extractive QA as a k-shot generation task for chat-tuned causal LMs.

Each question becomes a chat prompt in the training format (``corpusfactory.chatformat``):
``k`` solved examples, each its own conversation, then the question, then the assistant tag::

    [|Umano|] Contesto: <context>
    Domanda: <question>
    [|Assistente|] <first gold answer>

    [|Umano|] Contesto: <context>
    Domanda: <question>
    [|Assistente|]

The model answers greedily; the answer ends at a chat tag or at the first newline. Predictions
are scored with the official SQuAD v1.1 normalisation (``f1``/``em``) and with the variant that
also drops Italian articles (``f1_it``/``em_it``), both as percentages.

Choices:

* Shots come from the whole loaded file, not from the ``limit`` subset, so an item's prompt does
  not depend on ``limit`` and a subset's scores are comparable with a full run on those items.
  They are drawn per item from a generator seeded by ``seed`` and the item id, one question from
  each of ``k`` different paragraphs, never from the item's own paragraph (same context), so an
  example never reveals the answer.
* A shot shows its first non-empty gold answer (a few SQuAD-it answers are empty strings).
* Whitespace inside contexts and questions is collapsed so a newline cannot look like a turn.
* A prompt that does not fit the model's context loses shots from the end of the list, one at
  a time; if even the 0-shot prompt does not fit it is kept and ``CausalLM`` cuts it on the left
  (the item counts as ``truncated``).
* Prompts are generated in order of length so a batch holds prompts of similar length (less
  padding); the predictions file keeps the file's order.
* Every number can be recomputed from the predictions JSONL with ``rescore_predictions``.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corpusfactory.atomicio import write_jsonl_atomic
from corpusfactory.chatformat import ChatFormat, Message
from training.evaluation.metrics import squad_scores

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "squad_it.predictions.jsonl"


@dataclass(frozen=True)
class SquadItem:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]


class GeneratorLM(Protocol):
    """What the task needs from a model (``training.evaluation.lm.CausalLM`` fits)."""

    def fits(self, prompt: str, max_new_tokens: int = 0) -> bool: ...

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]: ...


# -- loading -------------------------------------------------------------------------------------


def _field(obj: Any, key: str, kind: type, path: Path, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: {where} has no {key!r} (not SQuAD v1.1 JSON)")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{path}: {where}.{key} is not a {kind.__name__}")
    return obj[key]


def load_squad(path: str | Path) -> list[SquadItem]:
    """Every question of a SQuAD v1.1 file (``.json`` or ``.json.gz``), in file order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read SQuAD JSON: {exc}") from exc
    items: list[SquadItem] = []
    seen: set[str] = set()
    for a, article in enumerate(_field(data, "data", list, path, "top level")):
        where = f"data[{a}]"
        title = _field(article, "title", str, path, where)
        for p, para in enumerate(_field(article, "paragraphs", list, path, where)):
            pwhere = f"{where}.paragraphs[{p}]"
            context = _field(para, "context", str, path, pwhere)
            for q, qa in enumerate(_field(para, "qas", list, path, pwhere)):
                qwhere = f"{pwhere}.qas[{q}]"
                qid = _field(qa, "id", str, path, qwhere)
                question = _field(qa, "question", str, path, qwhere)
                answers = _field(qa, "answers", list, path, qwhere)
                if not answers:
                    raise ValueError(f"{path}: question {qid!r} ({qwhere}) has no answers")
                texts = tuple(
                    _field(ans, "text", str, path, f"{qwhere}.answers[{i}]")
                    for i, ans in enumerate(answers)
                )
                # Predictions are keyed by id, so a repeated id would silently lose a question.
                if qid in seen:
                    raise ValueError(f"{path}: question id {qid!r} appears more than once")
                seen.add(qid)
                items.append(SquadItem(qid, title, context, question, texts))
    return items


def article_filter(articles: str) -> Callable[[str], bool] | None:
    """The title test for ``evaluation.squad_it_articles`` (None: every article)."""
    if articles == "all":
        return None
    if articles == "scorer_heldout":
        from corpusfactory.engines.models.italian_data import is_heldout_article

        return is_heldout_article
    raise ValueError(f"unknown squad_it_articles {articles!r}: use 'all' or 'scorer_heldout'")


def select_items(
    items: Sequence[SquadItem],
    limit: int | None,
    seed: int,
    articles: Callable[[str], bool] | None = None,
) -> list[SquadItem]:
    """All items, or a seeded random subset of ``limit`` of them in their original order.

    ``articles`` keeps only the items whose article title it accepts, before the draw.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if articles is not None:
        items = [item for item in items if articles(item.title)]
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


# -- prompts -------------------------------------------------------------------------------------


class ShotSampler:
    """Chooses k-shot examples for an item from other paragraphs of ``pool``."""

    def __init__(self, pool: Sequence[SquadItem], seed: int) -> None:
        self.seed = seed
        # Paragraphs are identified by their context text: SQuAD-it repeats a few contexts under
        # different paragraph entries, and those must count as the same paragraph.
        groups: dict[str, list[SquadItem]] = {}
        for item in pool:
            groups.setdefault(item.context, []).append(item)
        self.paragraphs = list(groups.values())
        self.index = {context: i for i, context in enumerate(groups)}

    def choose(self, item: SquadItem, k: int) -> list[SquadItem]:
        # A string seed is hashed with SHA-512 by random, so this is stable across processes.
        rng = random.Random(f"{self.seed}:{item.id}")
        own = self.index.get(item.context)
        others = len(self.paragraphs) - (own is not None)
        shots = []
        for p in rng.sample(range(others), min(k, others)):
            if own is not None and p >= own:  # skip over the item's own paragraph
                p += 1
            para = self.paragraphs[p]
            shots.append(para[rng.randrange(len(para))])
        return shots


def _clean(text: str) -> str:
    return " ".join(text.split())


def _user_turn(item: SquadItem) -> Message:
    return Message("user", f"Contesto: {_clean(item.context)}\nDomanda: {_clean(item.question)}")


def build_prompt(item: SquadItem, shots: Sequence[SquadItem], fmt: ChatFormat) -> str:
    """The chat prompt for ``item`` with ``shots`` as solved example conversations."""
    examples = [
        [_user_turn(s), Message("assistant", next((a for a in s.answers if a.strip()), ""))]
        for s in shots
    ]
    return fmt.prompt(history=[_user_turn(item)], next_role="assistant", examples=examples)


def fit_prompt(
    lm: GeneratorLM, item: SquadItem, shots: Sequence[SquadItem], fmt: ChatFormat, max_new: int
) -> tuple[str, int, bool]:
    """The prompt with as many of ``shots`` as fit: (prompt, shots used, truncated)."""
    for used in range(len(shots), -1, -1):
        prompt = build_prompt(item, shots[:used], fmt)
        if lm.fits(prompt, max_new):
            return prompt, used, False
    return build_prompt(item, [], fmt), 0, True


# -- scoring and the task ------------------------------------------------------------------------


def _scores(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, Any]:
    official = squad_scores(predictions, references)
    italian = squad_scores(predictions, references, italian=True)
    return {
        "f1": official["f1"],
        "em": official["em"],
        "f1_it": italian["f1"],
        "em_it": italian["em"],
        "n": official["n"],
    }


def rescore_predictions(path: str | Path) -> dict[str, Any]:
    """``f1``/``em``/``f1_it``/``em_it``/``n`` recomputed from a predictions JSONL."""
    predictions: dict[str, str] = {}
    references: dict[str, Sequence[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            qid = row["id"]
            if qid in references:
                raise ValueError(f"{path}:{lineno}: id {qid!r} appears more than once")
            predictions[qid] = row["prediction"]
            references[qid] = list(row["answers"])
    return _scores(predictions, references)


def evaluate_squad_it(
    lm: GeneratorLM,
    path: str | Path,
    out_dir: str | Path,
    *,
    shots: int = 3,
    limit: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 32,
    fmt: ChatFormat = ChatFormat(),
    articles: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Run SQuAD-it k-shot on ``lm``; write the predictions JSONL and return the scores."""
    if shots < 0 or max_new_tokens < 1:
        raise ValueError(f"need shots >= 0 and max_new_tokens >= 1, got {shots}, {max_new_tokens}")
    started = time.monotonic()
    pool = load_squad(path)
    items = select_items(pool, limit, seed, articles)
    sampler = ShotSampler(pool, seed)
    prompts: list[str] = []
    reduced = truncated = 0
    for item in items:
        prompt, used, cut = fit_prompt(lm, item, sampler.choose(item, shots), fmt, max_new_tokens)
        prompts.append(prompt)
        reduced += used < shots
        truncated += cut
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    log.info(
        "squad_it: %d questions, %d-shot, %d reduced, %d truncated",
        len(items),
        shots,
        reduced,
        truncated,
    )
    outputs = lm.generate(
        [prompts[i] for i in order], max_new_tokens, stop=[*fmt.stop_strings, "\n"]
    )
    predictions: dict[str, str] = {}
    for i, text in zip(order, outputs, strict=True):
        predictions[items[i].id] = text
    rows = [
        {"id": it.id, "prediction": predictions[it.id], "answers": list(it.answers)} for it in items
    ]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / PREDICTIONS_FILE, rows)
    scores = _scores(predictions, {it.id: it.answers for it in items})
    return {
        "task": "squad_it",
        **scores,
        "shots": shots,
        "limit": limit,
        "seed": seed,
        "shots_reduced": reduced,
        "truncated": truncated,
        "predictions": str(out / PREDICTIONS_FILE),
        "seconds": round(time.monotonic() - started, 3),
    }
