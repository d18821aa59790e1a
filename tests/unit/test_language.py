"""The optional language rule (Lingua): Italian passes, other languages are caught."""

from __future__ import annotations

import pytest

from corpusfactory.contract import Reason
from corpusfactory.engines.language import LanguageCheck
from corpusfactory.errors import ConfigError
from streams.decisions import precheck


@pytest.fixture(scope="module")
def italian() -> LanguageCheck:
    return LanguageCheck("it", min_chars=20)


def test_target_language_passes(italian: LanguageCheck) -> None:
    assert italian.ok("Domani andiamo al mare con tutta la famiglia, se non piove.")
    assert italian.detect("Domani andiamo al mare con tutta la famiglia.") == "it"


def test_other_languages_are_rejected(italian: LanguageCheck) -> None:
    english = "Tomorrow we are going to the seaside with the whole family."
    german = "Morgen fahren wir mit der ganzen Familie ans Meer, wenn es nicht regnet."
    assert not italian.ok(english)
    assert not italian.ok(german)
    reason = precheck(english, max_chars=1000, language_ok=italian.ok(english))
    assert reason == Reason.WRONG_LANGUAGE


def test_short_texts_are_not_judged(italian: LanguageCheck) -> None:
    assert italian.ok("Okay, thanks!")  # under min_chars: too short to tell


def test_unknown_code_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown ISO 639-1"):
        LanguageCheck("xx")
