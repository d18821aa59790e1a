"""EVALITA-style k-shot classification by rank scoring: AMI 2020, IronITA 2018, SENTIPOLC 2014.

The task files and the layouts their readers accept are described in ``evalita_files``.

Method (rank classification). The same k shots (default 5) serve every test item: drawn from
the train file with ``seed``, balanced across labels as far as the file allows, in a seeded
order. Each shot and then the test item is a chat turn pair in ``ChatFormat``: the user turn
``{instruction}\\nTesto: {text}``, the assistant turn the label's verbalisation; the prompt
ends with the assistant tag. The prediction is the label whose verbalisation ``v`` has the
highest ``lm.loglikelihood(prompt, " " + v)``, ties going to the first label in task order.
The score is the plain sum of log-probabilities, not a per-token mean: the verbalisations are
single short words (one or two tokens on the usual Italian-aware tokenizers), so the two
rankings rarely differ and the sum is the likelihood the model actually assigns to the answer.
The cost: a word split into more tokens is slightly disfavoured (on the demo model's small BPE
``positivo`` is three tokens, ``misto`` two), so the per-item ``scores`` are kept for audit.

If a prompt (plus the longest answer) does not fit the model, shots are dropped from the
front until it does (the item counts in ``shots_reduced``); if even the bare question is too
long, the LM cuts the prompt on the left (the item counts in ``truncated``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corpusfactory.atomicio import write_jsonl_atomic
from corpusfactory.chatformat import ChatFormat, Message
from training.evaluation.evalita_files import (
    EvalitaFileError,
    Example,
    read_ami2020,
    read_ironita2018,
    read_sentipolc2014,
)
from training.evaluation.lm import CausalLM
from training.evaluation.metrics import classification_scores

log = logging.getLogger(__name__)


class Reader(Protocol):
    def __call__(self, path: str | Path, split: str | None = None) -> list[Example]: ...


@dataclass(frozen=True)
class TaskSpec:
    name: str
    reader: Reader  # split None: every record; "train"/"test": a single file's rows of that split
    labels: tuple[str, ...]
    verbalisations: dict[str, str]  # label -> the word the model should answer
    instruction: str


TASKS: dict[str, TaskSpec] = {
    "ami2020": TaskSpec(
        "ami2020",
        read_ami2020,
        ("non_misogynous", "misogynous"),
        {"non_misogynous": "no", "misogynous": "sì"},
        "Il testo è misogino? Rispondi sì o no.",
    ),
    "ironita2018": TaskSpec(
        "ironita2018",
        read_ironita2018,
        ("non_ironic", "ironic"),
        {"non_ironic": "no", "ironic": "sì"},
        "Il testo è ironico? Rispondi sì o no.",
    ),
    "sentipolc2014": TaskSpec(
        "sentipolc2014",
        read_sentipolc2014,
        ("positive", "negative", "neutral", "mixed"),
        {"positive": "positivo", "negative": "negativo", "neutral": "neutro", "mixed": "misto"},
        "Qual è la polarità del testo? Rispondi positivo, negativo, neutro o misto.",
    ),
}


# -- prompts -----------------------------------------------------------------------------------


def select_shots(
    train: Sequence[Example], k: int, seed: int, labels: Sequence[str]
) -> list[Example]:
    """k train examples, label counts differing by at most one while every label has enough.

    Labels take turns in a seeded order (so no label is always the one with the extra shot),
    each drawing from its own seeded shuffle; the picks are then shuffled so the last shot,
    the one nearest the question, is not always the same label.
    """
    rng = random.Random(seed)
    pools = {label: [ex for ex in train if ex.label == label] for label in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    order = list(labels)
    rng.shuffle(order)
    picked: list[Example] = []
    while len(picked) < k and any(pools.values()):
        for label in order:
            if pools[label] and len(picked) < k:
                picked.append(pools[label].pop())
    rng.shuffle(picked)
    return picked


def _question(spec: TaskSpec, text: str) -> Message:
    return Message("user", f"{spec.instruction}\nTesto: {text}")


def build_prompt(
    spec: TaskSpec, shots: Sequence[Example], text: str, fmt: ChatFormat = ChatFormat()
) -> str:
    """The shots as solved exchanges, then the question, ending with the assistant tag."""
    examples = [
        [_question(spec, ex.text), Message("assistant", spec.verbalisations[ex.label])]
        for ex in shots
    ]
    return fmt.prompt([_question(spec, text)], "assistant", examples)


# -- evaluation --------------------------------------------------------------------------------


def evaluate_evalita(
    lm: CausalLM,
    task: str,
    train_path: str | Path,
    test_path: str | Path,
    out_dir: str | Path,
    *,
    shots: int = 5,
    limit: int | None = None,
    seed: int = 0,
    fmt: ChatFormat = ChatFormat(),
) -> dict[str, Any]:
    """Score ``lm`` on one task; write ``out_dir/<task>.predictions.jsonl``; return the metrics.

    Returns ``{"task", "macro_f1", "accuracy", "n", "labels", "per_label", "shots",
    "shots_reduced", "truncated", "predictions", "seconds"}``: macro F1, accuracy and the
    per-label precision / recall / F1 as percentages, ``shots`` the number of shots selected.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    started = time.perf_counter()
    spec = TASKS[task]
    # A single file given as both: its train rows give the shots, its test rows the items.
    train = spec.reader(Path(train_path), "train")
    test = spec.reader(Path(test_path), "test")
    if not test:
        raise EvalitaFileError(f"{test_path}: no test items")
    if limit is not None and limit < len(test):
        keep = sorted(random.Random(seed).sample(range(len(test)), limit))
        test = [test[i] for i in keep]
    chosen = select_shots(train, shots, seed, spec.labels)

    answers = {label: " " + spec.verbalisations[label] for label in spec.labels}
    answer_tokens = max(lm.count_tokens(a) for a in answers.values())
    prompts: list[str] = []
    shots_reduced = truncated = 0
    for ex in test:
        used = list(chosen)
        prompt = build_prompt(spec, used, ex.text, fmt)
        while used and not lm.fits(prompt, answer_tokens):
            used.pop(0)
            prompt = build_prompt(spec, used, ex.text, fmt)
        shots_reduced += len(used) < len(chosen)
        truncated += not lm.fits(prompt, answer_tokens)  # the LM will cut it on the left
        prompts.append(prompt)

    requests = [(p, answers[label]) for p in prompts for label in spec.labels]
    flat = lm.loglikelihood(requests)
    rows: list[dict[str, Any]] = []
    for i, ex in enumerate(test):
        item = flat[i * len(spec.labels) : (i + 1) * len(spec.labels)]
        scores = dict(zip(spec.labels, item, strict=True))
        best = max(spec.labels, key=lambda lab: scores[lab])  # max keeps the first on ties
        rows.append(
            {"id": ex.id, "text": ex.text, "prediction": best, "label": ex.label, "scores": scores}
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = (out / f"{task}.predictions.jsonl").resolve()
    write_jsonl_atomic(pred_path, rows)

    scores_all = classification_scores(
        [r["label"] for r in rows], [r["prediction"] for r in rows], labels=spec.labels
    )
    per_label = {
        label: {
            "precision": 100.0 * s["precision"],
            "recall": 100.0 * s["recall"],
            "f1": 100.0 * s["f1"],
            "support": s["support"],
        }
        for label, s in scores_all["per_label"].items()
    }
    result = {
        "task": task,
        "macro_f1": 100.0 * scores_all["macro_f1"],
        "accuracy": 100.0 * scores_all["accuracy"],
        "n": len(rows),
        "labels": list(spec.labels),
        "per_label": per_label,
        "shots": len(chosen),
        "shots_reduced": shots_reduced,
        "truncated": truncated,
        "predictions": str(pred_path),
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "%s: macro F1 %.2f, accuracy %.2f on %d items (%d shots, %d reduced, %d truncated)",
        task,
        result["macro_f1"],
        result["accuracy"],
        len(rows),
        len(chosen),
        shots_reduced,
        truncated,
    )
    return result
