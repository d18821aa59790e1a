"""The LLM-as-judge stage: the score parser, the templates, the decision, the Judge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from corpusfactory.contract import Reason
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.errors import GeneratorError
from corpusfactory.settings import GenerationSettings
from producers.generators.base import Generator
from streams.judge import (
    CONTEXT_BLOCK_EN,
    JUDGE_TEMPLATE_EN,
    JUDGE_TEMPLATE_IT,
    Judge,
    JudgeResult,
    JudgeSettings,
    judge_decision,
    load_template,
    make_judge_generator,
    parse_score,
    render_prompt,
)

# ---------------------------------------------------------------------------------
# parse_score

PARSE_CASES: list[tuple[str, float | None]] = [
    # the template's own shape: the score alone on the first line
    ("4", 4.0),
    ("4\nLa risposta è corretta e completa.", 4.0),
    ("  \n\n   4\nLa risposta è corretta.", 4.0),
    ("4.\nLa risposta è buona.", 4.0),
    ("4.5\nBuona risposta, manca un dettaglio.", 4.5),
    ("4,5\nBuona risposta, manca un dettaglio.", 4.5),
    ("0\nThe response is off-topic.", 0.0),
    # labels
    ("Punteggio: 4\nLa risposta è chiara.", 4.0),
    ("SCORE: 5", 5.0),
    ("Rating: 0", 0.0),
    ("Voto: 3 - la risposta è parziale", 3.0),
    ("Score - 2", 2.0),
    ("Punteggio complessivo assegnato: 3,5", 3.5),
    ("Punteggio (0-5): 4", 4.0),
    ("Il punteggio è 4 perché la risposta è chiara.", 4.0),
    ("Score:\n4\nThe response answers the question.", 4.0),
    ("Valutazione:\n\n3", 3.0),
    # markdown and bullets
    ("**4**\n\nLa risposta è corretta.", 4.0),
    ("## Valutazione\n**Punteggio:** 2,5/5", 2.5),
    ("- 4\n- chiara\n- corretta", 4.0),
    ("[4]", 4.0),
    ("(4) Buona risposta.", 4.0),
    ("`3`", 3.0),
    # fractions and scales
    ("Score: 4/5\nThe answer is accurate.", 4.0),
    ("4 su 5 - risposta chiara", 4.0),
    ("Final score: 4 out of 5.", 4.0),
    ("0/5 - the response is off-topic", 0.0),
    ("10/10\nPerfetta.", 5.0),
    ("8/10", 4.0),
    ("Score: 8.5/10", 4.25),
    ("Score: 85/100", 4.25),
    ("Score: 3/4", None),  # an unsupported scale
    ("Score: 6/5", None),  # above its own scale
    ("15/10", None),
    # chatter before the score
    ("La risposta è corretta ma poco dettagliata.\nScore: 3", 3.0),
    ("La risposta merita un 4/5: chiara e corretta.", 4.0),
    ("Il 12/5 ho controllato la data. Punteggio: 3", 3.0),  # 12/5 is no score
    ("5 motivi per cui la risposta è valida:\n1. chiara\nPunteggio: 2", 2.0),
    ("1. La risposta è chiara\n2. Manca un esempio\nPunteggio: 3", 3.0),
    ("Valutazione\n1. La risposta è buona.\nVoto: 4", 4.0),
    ("<think>Forse 2? No, meglio.</think>\n5\nEccellente.", 5.0),
    ("ragionamento senza tag di apertura</think>\nScore: 1", 1.0),
    ("Due to the errors, score: 1", 1.0),
    # out of range, ambiguous, first candidate decides
    ("7\nOttima risposta.", None),
    ("Score: 10", None),
    ("-1\nNegativa.", None),
    ("Score: 3-4", None),
    ("3 - 4\nDipende dai punti di vista.", None),
    ("Score: 7\nOn reflection, Score: 4", None),
    ("2023: un anno difficile.\nScore: 4", None),
    # number words
    ("Quattro.\nLa risposta è buona.", 4.0),
    ("four out of five", 4.0),
    ("Voto: cinque su cinque", 5.0),
    ("Tre motivi rendono la risposta debole.", None),
    # nothing score-like
    ("", None),
    ("   \n \n", None),
    ("La risposta è sbagliata e non utile.", None),
    ("Ho 2 osservazioni sulla risposta.", None),
    ("4 stars", None),
    ("4. La risposta è buona", None),  # a numbered-list marker
    ("Risposta: 4", None),  # "Risposta" is no score label
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_score(text: str, expected: float | None) -> None:
    assert parse_score(text) == expected


def test_parse_score_covers_enough_cases() -> None:
    assert len(PARSE_CASES) >= 25
    assert len({t for t, _ in PARSE_CASES}) == len(PARSE_CASES)


def test_parse_score_returns_floats_within_the_scale() -> None:
    for text, _ in PARSE_CASES:
        score = parse_score(text)
        assert score is None or (isinstance(score, float) and 0.0 <= score <= 5.0)


# ---------------------------------------------------------------------------------
# templates

EXPECTED_IT_WITH_CONTEXT = """\
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

### Conversazione precedente
[|Umano|] Ciao!
[|Assistente|] Ciao, come posso aiutarti?

### Richiesta dell'utente
Qual è la capitale d'Italia?

### Risposta dell'assistente
La capitale d'Italia è Roma.

### Come rispondere
Sulla prima riga scrivi soltanto il punteggio: un numero da 0 a 5 (sono ammessi i \
mezzi punti, per esempio 3.5), senza altre parole. Dalla seconda riga in poi spiega \
in breve perché hai dato quel punteggio.

### Valutazione
"""

INSTRUCTION = "Qual è la capitale d'Italia?"
RESPONSE = "La capitale d'Italia è Roma."
CONTEXT = "[|Umano|] Ciao!\n[|Assistente|] Ciao, come posso aiutarti?"


def test_italian_template_renders_exactly() -> None:
    got = render_prompt(JUDGE_TEMPLATE_IT, f"  {INSTRUCTION}\n", f"\n{RESPONSE} ", CONTEXT)
    assert got == EXPECTED_IT_WITH_CONTEXT


def test_without_context_the_block_vanishes() -> None:
    block = "### Conversazione precedente\n" + CONTEXT + "\n\n"
    expected = EXPECTED_IT_WITH_CONTEXT.replace(block, "")
    assert render_prompt(JUDGE_TEMPLATE_IT, INSTRUCTION, RESPONSE) == expected
    assert render_prompt(JUDGE_TEMPLATE_IT, INSTRUCTION, RESPONSE, "  \n") == expected
    assert "Conversazione precedente" not in expected


def test_english_template_renders_exactly() -> None:
    got = render_prompt(
        JUDGE_TEMPLATE_EN,
        "What is the capital of Italy?",
        "Rome.",
        "[|Umano|] Hi",
        CONTEXT_BLOCK_EN,
    )
    assert got == (
        "You are a careful and impartial reviewer. You are shown a user's request and an "
        "assistant's response. Rate how helpful and accurate the response is for that "
        "request. If the earlier conversation is shown too, read the request in its light.\n"
        "\n"
        "Use a scale from 0 to 5:\n"
        "0 = no useful answer, or a wrong or off-topic one;\n"
        "1 = mostly wrong or unhelpful;\n"
        "2 = some useful content, but with major errors or gaps;\n"
        "3 = acceptable: substantially correct, but incomplete or unclear;\n"
        "4 = good: correct, relevant and clear, with minor flaws;\n"
        "5 = excellent: correct, complete, clear and well written.\n"
        "\n"
        "### Earlier conversation\n"
        "[|Umano|] Hi\n"
        "\n"
        "### User request\n"
        "What is the capital of Italy?\n"
        "\n"
        "### Assistant response\n"
        "Rome.\n"
        "\n"
        "### How to answer\n"
        "On the first line write only the score: a number from 0 to 5 (half points such as "
        "3.5 are allowed), with no other words. From the second line on, briefly explain why "
        "you gave that score.\n"
        "\n"
        "### Rating\n"
    )


def test_substitution_is_one_pass_and_leaves_other_braces_alone() -> None:
    template = 'JSON {"a": 1} | I={instruction} | R={response} | {context}| {other}'
    got = render_prompt(template, "scrivi {response}", "ecco {instruction} e {context}", "c")
    assert got == (
        'JSON {"a": 1} | I=scrivi {response} | R=ecco {instruction} e {context} | '
        "### Conversazione precedente\nc\n\n| {other}"
    )


def test_load_template(tmp_path: Path) -> None:
    assert load_template(None) == JUDGE_TEMPLATE_IT
    assert load_template(None, "en") == JUDGE_TEMPLATE_EN
    assert load_template("Q: {instruction}\nA: {response}\n") == "Q: {instruction}\nA: {response}\n"
    path = tmp_path / "judge.txt"
    path.write_text("Domanda: {instruction}\nRisposta: {response}\nVoto:", encoding="utf-8")
    assert load_template(str(path)) == "Domanda: {instruction}\nRisposta: {response}\nVoto:"
    with pytest.raises(ValueError, match="cannot read"):
        load_template(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("only {instruction}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\{response\}"):
        load_template(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match=r"\{instruction\}"):
        load_template("only {response}")


# ---------------------------------------------------------------------------------
# the decision


def test_judge_decision() -> None:
    assert judge_decision(3.0, 3.0) == (True, "")
    assert judge_decision(5.0, 3.0) == (True, "")
    assert judge_decision(2.5, 3.0) == (False, Reason.JUDGE_LOW)
    assert judge_decision(0.0, 0.0) == (True, "")
    assert judge_decision(None, 3.0) == (False, Reason.JUDGE_UNPARSED)
    assert judge_decision(None, 3.0, "reject") == (False, Reason.JUDGE_UNPARSED)
    assert judge_decision(None, 3.0, "accept") == (True, Reason.JUDGE_UNPARSED)


# ---------------------------------------------------------------------------------
# Judge.rate with a test double: exact texts in, exact scores out


class ScriptedGenerator:
    """TEST DOUBLE of the generator interface: returns scripted texts, records calls.

    Used only to pin exact judge outputs to exact scores through ``Judge.rate``; the
    real engine cannot be made to write chosen texts. The end-to-end test below uses
    the real demo model through the transformers backend.
    """

    def __init__(self, outputs: list[str], *, extra: int = 0) -> None:
        self.id = "scripted:test-double"
        self._outputs = list(outputs)
        self._extra = extra  # outputs to add to each batch (a broken backend)
        self.calls: list[tuple[list[str], GenerationSettings, list[str]]] = []
        self.closed = False

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        self.calls.append((list(prompts), params, list(stop)))
        n = len(prompts) + self._extra
        out, self._outputs = self._outputs[:n], self._outputs[n:]
        return out

    def close(self) -> None:
        self.closed = True


def test_scripted_generator_implements_the_interface() -> None:
    assert isinstance(ScriptedGenerator([]), Generator)


SCRIPT = [
    "4\nLa risposta è corretta.",
    "Punteggio: 2\nMancano dettagli.",
    "La risposta è inutile.",
    "**3**",
    "Score: 10",
]
PAIRS = [(f"domanda {i}", f"risposta {i}") for i in range(len(SCRIPT))]


def test_rate_scores_exact_texts_and_batches_through_the_generator() -> None:
    gen = ScriptedGenerator(SCRIPT)
    judge = Judge(gen, JUDGE_TEMPLATE_IT, 3.0, 32, 0.0, batch_size=2, seed=7)
    contexts = ["[|Umano|] prima", None, None, None, None]
    results = judge.rate(PAIRS, contexts)
    assert results == [
        JudgeResult(4.0, SCRIPT[0], True, ""),
        JudgeResult(2.0, SCRIPT[1], False, Reason.JUDGE_LOW),
        JudgeResult(None, SCRIPT[2], False, Reason.JUDGE_UNPARSED),
        JudgeResult(3.0, SCRIPT[3], True, ""),
        JudgeResult(None, SCRIPT[4], False, Reason.JUDGE_UNPARSED),
    ]
    assert [len(prompts) for prompts, _, _ in gen.calls] == [2, 2, 1]
    sent = [p for prompts, _, _ in gen.calls for p in prompts]
    assert sent == [judge.render(i, r, c) for (i, r), c in zip(PAIRS, contexts, strict=True)]
    assert "### Conversazione precedente\n[|Umano|] prima\n\n" in sent[0]
    assert "Conversazione precedente" not in sent[1]
    params = gen.calls[0][1]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (
        32,
        0.0,
        1.0,
        7,
    )
    assert gen.calls[0][2] == []
    assert judge.id == "scripted:test-double"
    assert not gen.closed  # the judge does not own its generator


def test_rate_on_unparsed_accept_and_threshold() -> None:
    judge = Judge(ScriptedGenerator(SCRIPT), threshold=4.0, on_unparsed="accept")
    results = judge.rate(PAIRS)
    assert [(r.score, r.passed, r.reason) for r in results] == [
        (4.0, True, ""),
        (2.0, False, Reason.JUDGE_LOW),
        (None, True, Reason.JUDGE_UNPARSED),
        (3.0, False, Reason.JUDGE_LOW),
        (None, True, Reason.JUDGE_UNPARSED),
    ]


def test_rate_of_nothing_calls_nothing() -> None:
    gen = ScriptedGenerator([])
    assert Judge(gen).rate([]) == []
    assert gen.calls == []


def test_rate_rejects_a_wrong_number_of_outputs() -> None:
    with pytest.raises(GeneratorError, match="returned 3 outputs for 2 prompts"):
        Judge(ScriptedGenerator(["4", "4", "4"], extra=1)).rate(PAIRS[:2])
    with pytest.raises(GeneratorError, match="returned 1 outputs for 2 prompts"):
        Judge(ScriptedGenerator(["4"])).rate(PAIRS[:2])


def test_judge_validates_its_arguments() -> None:
    gen = ScriptedGenerator([])
    with pytest.raises(ValueError, match="threshold"):
        Judge(gen, threshold=5.5)
    with pytest.raises(ValueError, match="on_unparsed"):
        Judge(gen, on_unparsed="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        Judge(gen, batch_size=0)
    with pytest.raises(ValueError, match="placeholder"):
        Judge(gen, template="no placeholders")
    with pytest.raises(ValidationError):
        Judge(gen, max_new_tokens=0)
    with pytest.raises(ValidationError):
        Judge(gen, temperature=-1.0)
    with pytest.raises(ValueError, match="one context"):
        Judge(gen).rate(PAIRS[:2], [None])


# ---------------------------------------------------------------------------------
# settings


def test_judge_settings_defaults_and_validation() -> None:
    s = JudgeSettings()
    assert (s.enabled, s.backend, s.model, s.template) == (False, "openai", None, None)
    assert (s.threshold, s.temperature, s.on_unparsed, s.language) == (3.0, 0.0, "reject", "it")
    with pytest.raises(ValidationError, match=r"judge.enabled needs judge.model"):
        JudgeSettings(enabled=True)
    with pytest.raises(ValidationError):
        JudgeSettings(threshold=6.0)
    with pytest.raises(ValidationError):
        JudgeSettings(on_unparsed="maybe")
    with pytest.raises(ValidationError, match=r"\{instruction\}"):
        JudgeSettings(template="only {response}")
    with pytest.raises(ValidationError):
        JudgeSettings(unknown=1)  # type: ignore[call-arg]


def test_judge_from_settings_uses_language_and_template() -> None:
    gen = ScriptedGenerator(["Score: 4"])
    judge = Judge.from_settings(
        JudgeSettings(language="en", threshold=4.5, max_new_tokens=9, batch_size=3), gen
    )
    assert judge.template == JUDGE_TEMPLATE_EN
    assert judge.render("q", "a", "ctx").count("### Earlier conversation\nctx\n\n") == 1
    assert judge.rate([("q", "a")]) == [JudgeResult(4.0, "Score: 4", False, Reason.JUDGE_LOW)]
    assert gen.calls[0][1].max_new_tokens == 9
    custom = Judge.from_settings(JudgeSettings(template="{instruction}|{response}"), gen)
    assert custom.render("q", "a") == "q|a"


# ---------------------------------------------------------------------------------
# end to end with the real demo generator (transformers backend)


@pytest.fixture(scope="module")
def demo_judge_generator(demo_models: DemoModels) -> Iterator[Generator]:
    settings = JudgeSettings(
        enabled=True, backend="transformers", model=str(demo_models.generator), device="cpu"
    )
    gen = make_judge_generator(settings)
    yield gen
    gen.close()


E2E_PAIRS = [
    ("Qual è la capitale d'Italia?", "La capitale d'Italia è Roma."),
    ("Mi consigli un libro?", "Ti consiglio I promessi sposi di Alessandro Manzoni."),
    ("Come si fa il caffè con la moka?", "Si riempie la caldaia d'acqua e si mette sul fuoco."),
]


def _consistent(results: list[JudgeResult], judge: Judge) -> None:
    assert len(results) == len(E2E_PAIRS)
    for r in results:
        assert isinstance(r.raw, str)
        assert r.score == parse_score(r.raw)
        if r.score is None:
            assert r.reason == Reason.JUDGE_UNPARSED
            assert r.passed is (judge.on_unparsed == "accept")
        else:
            assert 0.0 <= r.score <= 5.0
            assert r.passed is (r.score >= judge.threshold)
            assert r.reason == ("" if r.passed else Reason.JUDGE_LOW)


def test_rate_end_to_end_with_the_demo_generator(demo_judge_generator: Generator) -> None:
    assert demo_judge_generator.id.startswith("transformers:")
    judge = Judge(demo_judge_generator, JUDGE_TEMPLATE_IT, 3.0, 16, 0.0, batch_size=2)
    contexts = ["[|Umano|] Ciao!\n[|Assistente|] Ciao!", None, None]
    first = judge.rate(E2E_PAIRS, contexts)
    _consistent(first, judge)
    # Greedy decoding: the same pairs get the same raw outputs again.
    assert [r.raw for r in judge.rate(E2E_PAIRS, contexts)] == [r.raw for r in first]

    accepting = Judge(demo_judge_generator, threshold=0.0, max_new_tokens=16, on_unparsed="accept")
    results = accepting.rate(E2E_PAIRS)
    _consistent(results, accepting)
    assert all(r.passed for r in results)  # threshold 0 and unparsed accepted

    rejecting = Judge(demo_judge_generator, threshold=5.0, max_new_tokens=16)
    results = rejecting.rate(E2E_PAIRS)
    _consistent(results, rejecting)
    assert all(r.passed == (r.score == 5.0) for r in results)


def test_rate_end_to_end_sampled_english(demo_judge_generator: Generator) -> None:
    judge = Judge.from_settings(
        JudgeSettings(language="en", max_new_tokens=12, temperature=0.8, seed=3, batch_size=8),
        demo_judge_generator,
    )
    results = judge.rate(E2E_PAIRS)
    _consistent(results, judge)
