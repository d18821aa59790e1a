"""Dead letters: a record of where a bad event came from and why, that always encodes."""

from __future__ import annotations

import time

from corpusfactory.contract.limits import DEAD_VALUE_MAX_BYTES, ERROR_MAX_CHARS
from corpusfactory.contract.records import DeadLetter
from corpusfactory.contract.topics import SCHEMA_VERSION


def _raw_text(raw: bytes) -> str:
    """Bytes as text for a dead letter: UTF-8 with replacement, cut to its limit."""
    text = raw.decode("utf-8", errors="replace")
    encoded = text.encode("utf-8")
    if len(encoded) > DEAD_VALUE_MAX_BYTES:
        head = encoded[: DEAD_VALUE_MAX_BYTES - 40].decode("utf-8", errors="ignore")
        text = f"{head}... [{len(raw)} bytes]"
    return text


def _clean(text: str, most: int) -> str:
    """A string that encodes as UTF-8 (lone surrogates escaped), cut to ``most`` chars."""
    text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return text if len(text) <= most else text[: most - 3] + "..."


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: BaseException | str,
    stage: str,
) -> DeadLetter:
    """A DeadLetter record describing where a bad event came from and why.

    It always encodes: the key and value are decoded with replacement and cut to
    ``DEAD_VALUE_MAX_BYTES``, the error to ``ERROR_MAX_CHARS``, and lone
    surrogates in the error (an exception quoting a bad id) are escaped.
    """
    return DeadLetter(
        schema_version=SCHEMA_VERSION,
        origin_topic=_clean(topic, 249),
        origin_partition=partition,
        origin_offset=offset,
        key=None if key is None else _raw_text(key),
        value=None if value is None else _raw_text(value),
        error=_clean(str(error), ERROR_MAX_CHARS),
        error_type=type(error).__name__ if isinstance(error, BaseException) else "Error",
        stage=stage,
        at=time.time(),
    )
