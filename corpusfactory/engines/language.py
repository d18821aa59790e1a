"""Per-message language check (optional admission rule ``wrong_language``).

Uses the Lingua detector. Short texts are not judged: detection on a few words
is unreliable, and rejecting a good "Sì, grazie." would be worse than letting
an occasional foreign word through. The threshold is ``admission.language_min_chars``.
"""

from __future__ import annotations

from typing import Any

from corpusfactory.errors import ConfigError


class LanguageCheck:
    def __init__(self, iso_639_1: str, min_chars: int = 20) -> None:
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        try:
            code = IsoCode639_1.from_str(iso_639_1.lower())
        except (ValueError, AttributeError) as exc:
            raise ConfigError(
                [f"admission.language: unknown ISO 639-1 code {iso_639_1!r}"]
            ) from exc
        self.code = code
        self.min_chars = min_chars
        self._detector: Any = (
            LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()
        )

    def detect(self, text: str) -> str | None:
        lang = self._detector.detect_language_of(text)
        return None if lang is None else lang.iso_code_639_1.name.lower()

    def ok(self, text: str) -> bool:
        """True when the text is in the target language, or too short to tell."""
        if len(text.strip()) < self.min_chars:
            return True
        lang = self._detector.detect_language_of(text)
        return lang is not None and lang.iso_code_639_1 == self.code
