"""An optional LLM-as-judge admission stage (method.md §8): the library part.

A judge model reads an (instruction, response) pair, the user turn and the
assistant turn that answers it, optionally with the earlier turns as context,
and rates the response's helpfulness and accuracy on a 0-5 scale. The template
asks for the score alone on the first line and an explanation after it, the
shape the Alpagasus filtering work uses; :func:`parse_score` reads the score
back out of whatever the judge actually wrote.

The decision is a plain function, as in :mod:`streams.decisions`:
:func:`judge_decision` turns (score, threshold, on_unparsed) into
``(passed, reason)``. A score at or above the threshold passes with reason
``""``; a lower one fails with :data:`Reason.JUDGE_LOW`; an output with no readable
score has its own outcome, :data:`Reason.JUDGE_UNPARSED`, which fails by default
(``on_unparsed="reject"``: an unreadable verdict is no evidence of quality) or
passes with ``on_unparsed="accept"`` (the judge then only removes turns it
positively rated low). The reason stays :data:`Reason.JUDGE_UNPARSED` either way, so
unreadable outputs can be counted apart from low scores.

:class:`Judge` renders the prompts, generates through any backend of the
project's generator interface (:mod:`producers.generators.base`) in batches,
parses and decides. :class:`JudgeSettings` (``Settings.judge``, defined in
:mod:`corpusfactory.settings` and re-exported here) configures it; ``enabled`` is
off by default. The scorer (:mod:`streams.score`) runs the judge and the admitter
(:mod:`streams.decisions`) applies :func:`judge_decision` last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corpusfactory.contract import Reason
from corpusfactory.errors import GeneratorError
from corpusfactory.judge_prompt import (
    CONTEXT_BLOCK_EN,
    CONTEXT_BLOCK_IT,
    JUDGE_TEMPLATE_EN,
    JUDGE_TEMPLATE_IT,
    JudgeLanguage,
    check_template,
    context_block_for,
    load_template,
    render_prompt,
)
from corpusfactory.settings import (
    GenerationSettings,
    JudgeSettings,
    OnUnparsed,
    ProducerSettings,
)

if TYPE_CHECKING:
    from producers.generators.base import Generator

__all__ = [
    "CONTEXT_BLOCK_EN",
    "CONTEXT_BLOCK_IT",
    "JUDGE_TEMPLATE_EN",
    "JUDGE_TEMPLATE_IT",
    "MAX_SCORE",
    "MIN_SCORE",
    "Judge",
    "JudgeLanguage",
    "JudgeResult",
    "JudgeSettings",
    "OnUnparsed",
    "check_template",
    "context_block_for",
    "judge_decision",
    "load_template",
    "make_judge_generator",
    "parse_score",
    "render_prompt",
]

MIN_SCORE = 0.0
MAX_SCORE = 5.0

# ---------------------------------------------------------------------------------
# The score parser.

_NUM_WORDS = {
    "zero": 0,
    "uno": 1,
    "due": 2,
    "tre": 3,
    "quattro": 4,
    "cinque": 5,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
}
_DEN_WORDS = {"cinque": 5, "five": 5, "dieci": 10, "ten": 10, "cento": 100, "hundred": 100}
_SCALES = (5.0, 10.0, 100.0)
_LABELS = ("punteggio", "voto", "valutazione", "giudizio", "score", "rating", "grade")


def _alternation(words: Sequence[str]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_NUMBER = rf"[0-9]+(?:[.,][0-9]+)?|(?:{_alternation(list(_NUM_WORDS))})(?!\w)"
_DENOM = rf"[0-9]+(?:[.,][0-9]+)?|(?:{_alternation(list(_DEN_WORDS))})(?!\w)"
_SCALE_SEP = r"[ \t]*(?:/|\bsu\b|\bout[ \t]+of\b)[ \t]*"
# A score: an optional opening bracket, an optional minus sign (so that "-1" is read
# and rejected as out of range, not read as 1), the number, an optional scale.
_VALUE = (
    rf"(?P<open>[(\[]\s*)?(?P<sign>[-−])?(?P<num>{_NUMBER})"
    rf"(?:{_SCALE_SEP}(?P<den>{_DENOM})(?![\w/]))?"
)
_CONNECTOR = r"(?:è(?:\s+(?:di|pari\s+a))?|is|of|di|pari\s+a|uguale\s+a)(?!\w)"
_LABELLED = re.compile(
    rf"(?<!\w)(?:{_alternation(_LABELS)})(?!\w)"
    r"(?:\s*\([^()\n]{0,20}\))?"  # "Punteggio (0-5): 4"
    r"(?:(?:[ \t]+[^\W\d_]+){1,3}?[ \t]*[:=]"  # "Punteggio complessivo assegnato: 4"
    rf"|\s*(?:[:=]|[-–—](?=\s)|{_CONNECTOR})?)"  # "Score: 4", "Voto - 4", "è 4", "Score 4"
    rf"\s*{_VALUE}",
    re.IGNORECASE,
)
_BARE = re.compile(_VALUE, re.IGNORECASE)
_FRACTION = re.compile(
    rf"(?<![\w/.,])(?P<num>{_NUMBER}){_SCALE_SEP}"
    rf"(?P<den>5|10|100|{_alternation(list(_DEN_WORDS))})(?![\w/]|[.,][0-9])",
    re.IGNORECASE,
)
_RANGE_AFTER = re.compile(r"\s*[-–—]\s*[0-9]")
_WORD_AFTER = re.compile(r"[ \t]*[^\W_]")
_LIST_MARKER_AFTER = re.compile(r"[.)][ \t]+[^\W_]")
_LINE_PREFIX = re.compile(r"^[ \t#>]*(?:[-+•][ \t]+)?")
_MARKUP = re.compile(r"[*_`]")


def _number(token: str) -> float:
    word = _NUM_WORDS.get(token.lower(), _DEN_WORDS.get(token.lower()))
    if word is not None:
        return float(word)
    return float(token.replace(",", "."))


def _value(m: re.Match[str], rest: str) -> float | None:
    """The 0-5 score a candidate match stands for, or None when it is not a valid one."""
    if m.group("sign") is not None:
        return None  # negative
    if m.group("den") is None and _RANGE_AFTER.match(rest):
        return None  # a range such as "3-4": ambiguous
    value = _number(m.group("num"))
    if m.group("den") is not None:
        den = _number(m.group("den"))
        if den not in _SCALES or not 0.0 <= value <= den:
            return None
        value = value * MAX_SCORE / den
    if not MIN_SCORE <= value <= MAX_SCORE:
        return None
    return value


def _clean(text: str) -> str:
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    text = text.replace("<think>", "")
    text = _MARKUP.sub("", text)
    return "\n".join(_LINE_PREFIX.sub("", line).rstrip() for line in text.splitlines())


def parse_score(text: str) -> float | None:
    """The 0-5 score in a judge's output, or None when none can be read.

    Rules, in order:

    1. Cleaning. When ``</think>`` occurs, only the text after its last occurrence
       is read (a reasoning block, whether or not its opening tag survived); a stray
       ``<think>`` tag is dropped. Markdown emphasis and code marks (``*``, ``_``,
       backticks) are removed everywhere, so ``**4**`` reads as ``4``. Each line
       loses its leading spaces, heading marks (``#``), quote marks (``>``) and one
       list bullet (``-``, ``+`` or ``•`` followed by a space), so ``- 4`` reads as
       ``4``. Blank lines are skipped.
    2. Numbers. A number is ``[0-9]+`` with an optional decimal part written with a
       point or, the Italian way, a comma (``4,5`` is 4.5; ``4, perché`` is 4). The
       number words zero..cinque and zero..five (any case) count as numbers; other
       words ("dieci" as a score, "mezzo") do not. A minus sign directly before a
       number makes it negative, hence out of range (``-1`` -> None).
    3. Scales. A number may be followed, on the same line, by ``/N``, ``su N`` or
       ``out of N`` (N a number, or cinque/five, dieci/ten, cento/hundred).
       N = 5 is the judge's own scale; N = 10 and N = 100 are converted linearly
       (``10/10`` -> 5.0, ``8/10`` -> 4.0, ``85/100`` -> 4.25). Any other N
       (``3/4``) makes the candidate invalid. A number above its N is invalid.
    4. Range. Without a scale the number must be within 0..5 inclusive: there is
       no guessing that ``7`` or ``10`` meant a 0-10 scale; such a candidate is
       invalid (rejected, never clamped). A range such as ``3-4`` or ``3 – 4`` is
       ambiguous and invalid.
    5. First line. The first non-blank line is read first, as the template asks.
       It holds a candidate when it starts with a number (optionally after ``(`` or
       ``[``), followed by a scale, or by the end of the line, or by anything but a
       letter or digit: ``4``, ``4.5``, ``4/5``, ``4 su 5``, ``4 - buona``,
       ``4: buona``, ``(4)``, ``Quattro.`` are candidates. It is not a candidate
       when a letter or digit follows (``5 motivi per...``, ``4 stelle``,
       ``Tre motivi``, ``4 5``), nor when a point or parenthesis then a word follows,
       a numbered-list marker (``1. La risposta``, ``2) Inoltre``), unless it was
       opened with a bracket (``(4) Buona`` is 4).
    6. Anywhere. Without a first-line candidate, the whole cleaned text is searched
       for the earliest of:
       a) a labelled score: one of the labels punteggio, voto, valutazione,
          giudizio, score, rating, grade (any case, as a whole word, so "Final
          score" and "Punteggio finale" work), optionally followed by a short
          parenthesis (``Punteggio (0-5): 4``), then either up to three words and
          ``:`` or ``=`` (``Punteggio complessivo: 4``), or an optional ``:``,
          ``=``, spaced dash, or connector (è, è di, è pari a, is, of, di, pari a,
          uguale a), then whitespace (newlines included: ``Score:\\n4``), then a
          number with an optional scale. On the label's own line anything may
          follow the number (``Score: 4 because...``, ``Il punteggio è 4 perché``);
          when the number sits on a later line than its label it must pass the
          test of rule 5, else that label is skipped (``Valutazione\n1. La
          risposta...`` is a heading over a list, not a 1);
       b) an unlabelled fraction over 5, 10 or 100 (``merita un 4/5``,
          ``tre su cinque``, ``8/10``) whose numerator does not exceed its
          denominator; others (``12/5``, a date) are skipped, not candidates.
       Other bare numbers in prose are never read (``Ho 2 osservazioni`` or ``5
       motivi`` do not count).
    7. The first candidate decides. If it is invalid under rules 2-4 the result
       is None: the parser does not fall back to a later number (``Score: 7 ...
       Score: 4`` -> None; a first line ``7`` -> None).
    8. No candidate at all -> None. The result is a float in [0, 5].
    """
    lines = [line for line in _clean(text).split("\n") if line]
    if not lines:
        return None
    first = lines[0]
    m = _BARE.match(first)
    if m is not None and _stands_alone(m, first[m.end() :]):
        return _value(m, first[m.end() :])
    body = "\n".join(lines)
    labelled = next(
        (
            lab
            for lab in _LABELLED.finditer(body)
            if "\n" not in body[lab.start() : _value_start(lab)]
            or _stands_alone(lab, body[lab.end() :].split("\n", 1)[0])
        ),
        None,
    )
    fraction = next(
        (f for f in _FRACTION.finditer(body) if _number(f["num"]) <= _number(f["den"])), None
    )
    if labelled is not None and (fraction is None or labelled.start() <= fraction.start()):
        return _value(labelled, body[labelled.end() :])
    if fraction is not None:
        return _value_of_fraction(fraction)
    return None


def _value_start(m: re.Match[str]) -> int:
    return min(m.start(g) for g in ("open", "sign", "num") if m.group(g) is not None)


def _stands_alone(m: re.Match[str], rest: str) -> bool:
    """Whether a number that starts a line is a score (rule 5): ``rest`` is the rest
    of that line after the number and its scale."""
    if m.group("den") is not None:
        return True
    if _WORD_AFTER.match(rest):
        return False
    return m.group("open") is not None or not _LIST_MARKER_AFTER.match(rest)


def _value_of_fraction(m: re.Match[str]) -> float | None:
    value = _number(m["num"]) * MAX_SCORE / _number(m["den"])
    return value if MIN_SCORE <= value <= MAX_SCORE else None


# ---------------------------------------------------------------------------------
# The decision and the judge.


def judge_decision(
    score: float | None, threshold: float, on_unparsed: OnUnparsed = "reject"
) -> tuple[bool, str]:
    """(passed, reason) for one judged pair.

    ``score >= threshold`` passes with reason ""; a lower score fails with
    Reason.JUDGE_LOW; a None score has reason Reason.JUDGE_UNPARSED and passes only when
    ``on_unparsed == "accept"``.
    """
    if score is None:
        return on_unparsed == "accept", Reason.JUDGE_UNPARSED
    if score >= threshold:
        return True, ""
    return False, Reason.JUDGE_LOW


@dataclass(frozen=True)
class JudgeResult:
    """One judged pair: the parsed score (None if unreadable), the judge's raw output,
    whether the pair passes, and why ("" when it passed on its score, Reason.JUDGE_LOW,
    Reason.JUDGE_UNPARSED)."""

    score: float | None
    raw: str
    passed: bool
    reason: str


class Judge:
    """Rates (instruction, response) pairs with a judge model.

    ``generator`` is any backend of the generator interface; the judge owns none of
    it (closing it is the caller's business). Generation is greedy at
    ``temperature`` 0 (the default of :class:`JudgeSettings`), sampled otherwise
    with ``top_p`` 1 and ``seed``. Pairs go to the generator ``batch_size`` at a
    time; ``stop`` strings cut each output (none by default: the explanation is
    kept in ``raw`` for audit, and ``max_new_tokens`` bounds it).
    """

    def __init__(
        self,
        generator: Generator,
        template: str = JUDGE_TEMPLATE_IT,
        threshold: float = 3.0,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        *,
        on_unparsed: OnUnparsed = "reject",
        context_block: str = CONTEXT_BLOCK_IT,
        batch_size: int = 8,
        seed: int = 0,
        stop: Sequence[str] = (),
    ) -> None:
        check_template(template)
        if not MIN_SCORE <= threshold <= MAX_SCORE:
            raise ValueError(f"threshold must be within 0..5, not {threshold}")
        if on_unparsed not in ("reject", "accept"):
            raise ValueError(f"on_unparsed must be 'reject' or 'accept', not {on_unparsed!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.generator = generator
        self.template = template
        self.threshold = threshold
        self.on_unparsed: OnUnparsed = on_unparsed
        self.context_block = context_block
        self.batch_size = batch_size
        self.stop = list(stop)
        # Validates max_new_tokens >= 1 and temperature >= 0.
        self.params = GenerationSettings(
            temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed
        )

    @classmethod
    def from_settings(cls, settings: JudgeSettings, generator: Generator) -> Judge:
        """A judge configured by ``settings`` (template and context block by language)."""
        return cls(
            generator,
            load_template(settings.template, settings.language),
            settings.threshold,
            settings.max_new_tokens,
            settings.temperature,
            on_unparsed=settings.on_unparsed,
            context_block=context_block_for(settings.language),
            batch_size=settings.batch_size,
            seed=settings.seed,
        )

    @property
    def id(self) -> str:
        """The judge generator's id, for the metadata kept with a record."""
        return self.generator.id

    def render(self, instruction: str, response: str, context: str | None = None) -> str:
        """The prompt the judge model sees for one pair."""
        return render_prompt(self.template, instruction, response, context, self.context_block)

    def rate(
        self,
        pairs: Sequence[tuple[str, str]],
        contexts: Sequence[str | None] | None = None,
    ) -> list[JudgeResult]:
        """One result per (instruction, response) pair, in order (blocking).

        ``contexts[i]``, when given, is the earlier conversation of pair i, rendered
        as text (or None). Raises GeneratorError when the backend fails or returns
        the wrong number of outputs.
        """
        if contexts is not None and len(contexts) != len(pairs):
            raise ValueError("one context (or None) is needed per pair")
        prompts = [
            self.render(instr, resp, contexts[i] if contexts is not None else None)
            for i, (instr, resp) in enumerate(pairs)
        ]
        results: list[JudgeResult] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            outputs = self.generator.generate(batch, self.params, self.stop)
            if len(outputs) != len(batch):
                raise GeneratorError(
                    f"judge generator {self.generator.id} returned {len(outputs)} outputs "
                    f"for {len(batch)} prompts"
                )
            for raw in outputs:
                score = parse_score(raw)
                passed, reason = judge_decision(score, self.threshold, self.on_unparsed)
                results.append(JudgeResult(score, raw, passed, reason))
        return results


# ---------------------------------------------------------------------------------
# The judge's generator.


def make_judge_generator(
    settings: JudgeSettings, models_dir: str | Path | None = None
) -> Generator:
    """Build the judge's generator with the project's generator factory.

    For the local backends (transformers, vllm) a ``demo:`` model name is resolved
    to the demo model's directory (built in ``models_dir`` if needed).
    """
    from producers.generators.factory import make_generator

    if not settings.model:
        raise ValueError("judge.model is not set")
    model = settings.model
    if settings.backend != "openai" and model.startswith("demo:"):
        from corpusfactory.engines.models.registry import resolve_model

        model = resolve_model(model, models_dir)
    producer = ProducerSettings(
        backend=settings.backend,
        openai_base_url=settings.openai_base_url,
        openai_api_key=settings.openai_api_key,
        openai_max_retries=settings.openai_max_retries,
        openai_timeout_s=settings.openai_timeout_s,
        generation=GenerationSettings(seed=settings.seed),
    )
    return make_generator(producer, model, settings.device)
