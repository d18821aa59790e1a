"""The LLM judge's prompt: its built-in templates (Italian and English), the check
and loading of a custom one, and the rendering of one (instruction, response,
context) pair into a prompt.

Part of the kernel because the settings validate a custom template when they load;
the judge stage itself (generation, score parsing, decision) is :mod:`streams.judge`.
Imports nothing of the project.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

JudgeLanguage = Literal["it", "en"]

# ---------------------------------------------------------------------------------
# Templates. Placeholders: {instruction}, {response} (both required) and {context}
# (optional). {context} is replaced by a whole block, heading included, when the pair
# has earlier turns, and by nothing when it has none; so it sits at the start of a
# line and the block ends with a blank line. Substitution is a single pass over the
# template: any other braces are left alone, and a placeholder written inside a
# conversation's text is never expanded.

JUDGE_TEMPLATE_IT = """\
Sei un revisore attento e imparziale. Ti vengono mostrate la richiesta di un utente \
e la risposta di un assistente. Valuta quanto la risposta è utile e accurata rispetto \
alla richiesta. Se compare anche la conversazione precedente, leggi la richiesta \
alla luce di quella.

Usa una scala da 0 a 5:
0 = nessuna risposta utile, oppure una risposta sbagliata o fuori tema;
1 = in gran parte sbagliata o inutile;
2 = qualche elemento utile, ma con errori o lacune importanti;
3 = accettabile: corretta nella sostanza, ma incompleta o poco chiara;
4 = buona: corretta, pertinente e chiara, con piccole imperfezioni;
5 = eccellente: corretta, completa, chiara e scritta in un italiano naturale.

{context}### Richiesta dell'utente
{instruction}

### Risposta dell'assistente
{response}

### Come rispondere
Sulla prima riga scrivi soltanto il punteggio: un numero da 0 a 5 (sono ammessi i \
mezzi punti, per esempio 3.5), senza altre parole. Dalla seconda riga in poi spiega \
in breve perché hai dato quel punteggio.

### Valutazione
"""

JUDGE_TEMPLATE_EN = """\
You are a careful and impartial reviewer. You are shown a user's request and an \
assistant's response. Rate how helpful and accurate the response is for that request. \
If the earlier conversation is shown too, read the request in its light.

Use a scale from 0 to 5:
0 = no useful answer, or a wrong or off-topic one;
1 = mostly wrong or unhelpful;
2 = some useful content, but with major errors or gaps;
3 = acceptable: substantially correct, but incomplete or unclear;
4 = good: correct, relevant and clear, with minor flaws;
5 = excellent: correct, complete, clear and well written.

{context}### User request
{instruction}

### Assistant response
{response}

### How to answer
On the first line write only the score: a number from 0 to 5 (half points such as \
3.5 are allowed), with no other words. From the second line on, briefly explain why \
you gave that score.

### Rating
"""

# What {context} becomes when a pair has earlier turns ({context} inside is the text).
CONTEXT_BLOCK_IT = "### Conversazione precedente\n{context}\n\n"
CONTEXT_BLOCK_EN = "### Earlier conversation\n{context}\n\n"

_TEMPLATES: dict[str, tuple[str, str]] = {
    "it": (JUDGE_TEMPLATE_IT, CONTEXT_BLOCK_IT),
    "en": (JUDGE_TEMPLATE_EN, CONTEXT_BLOCK_EN),
}
_PLACEHOLDER = re.compile(r"\{(instruction|response|context)\}")


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` has both {instruction} and {response}."""
    missing = [p for p in ("{instruction}", "{response}") if p not in template]
    if missing:
        raise ValueError(f"the judge template lacks the placeholder(s) {', '.join(missing)}")


def context_block_for(language: JudgeLanguage) -> str:
    """The built-in block {context} becomes, in ``language``."""
    return _TEMPLATES[language][1]


def load_template(value: str | None, language: JudgeLanguage = "it") -> str:
    """The template a setting names.

    ``None`` is the built-in template of ``language``. A value that contains
    ``{response}`` is the template text itself; any other value is the path of
    a UTF-8 file holding it. The template is checked with :func:`check_template`.
    Raises ValueError when the file cannot be read or the template is incomplete.
    """
    if value is None:
        return _TEMPLATES[language][0]
    if "{response}" in value:
        text = value
    else:
        path = Path(value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the judge template file {path}: {exc}") from None
    check_template(text)
    return text


def render_prompt(
    template: str,
    instruction: str,
    response: str,
    context: str | None = None,
    context_block: str = CONTEXT_BLOCK_IT,
) -> str:
    """The judge prompt for one pair: ``template`` with its placeholders filled in.

    The instruction, response and context are stripped of surrounding whitespace.
    An empty or missing context makes {context} vanish; otherwise it becomes
    ``context_block`` with the context in it.
    """
    ctx = (context or "").strip()
    values = {
        "instruction": instruction.strip(),
        "response": response.strip(),
        "context": context_block.replace("{context}", ctx) if ctx else "",
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
