"""The texts of the evaluation sets, for decontamination.

A snapshot must not train on its own test set, so the admission stage rejects a turn
too close to any evaluation item (reason ``contaminated``). The items, each with a
stable reference:

* SQuAD-it: every question (``eval:squad_it:q:<id>``) and every sentence of every
  context (``eval:squad_it:c:<sha1 of the sentence>``, at least ``min_chars`` long) of
  the questions the evaluator scores (``evaluation.squad_it_limit``'s seeded subset,
  or all 7,609). Sentences, not whole paragraphs: a turn copying one sentence of a
  long context would be far from the paragraph's embedding.
* EVALITA: every text of each configured test file (``eval:<task>:<id>``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from corpusfactory.settings import Settings

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def evaluation_items(settings: Settings, min_chars: int = 20) -> list[tuple[str, str]]:
    """(reference, text) of every evaluation item the settings configure, deduplicated."""
    e = settings.evaluation
    items: dict[str, str] = {}
    if "squad_it" in e.tasks and e.squad_it_path:
        from training.evaluation.squad_it import article_filter, load_squad, select_items

        chosen = select_items(
            load_squad(e.squad_it_path),
            e.squad_it_limit,
            e.seed,
            article_filter(e.squad_it_articles),
        )
        for item in chosen:
            items[f"eval:squad_it:q:{item.id}"] = item.question
            for sentence in _SENTENCE_END.split(item.context):
                sentence = " ".join(sentence.split())
                if len(sentence) >= min_chars:
                    digest = hashlib.sha1(sentence.encode("utf-8")).hexdigest()[:16]
                    items[f"eval:squad_it:c:{digest}"] = sentence
    if e.evalita:
        from training.evaluation.evalita import TASKS

        for task, files in sorted(e.evalita.items()):
            if task not in e.tasks:
                continue
            for ex in TASKS[task].reader(Path(files.test), "test"):
                items[f"eval:{task}:{ex.id}"] = ex.text
    return sorted(items.items())
