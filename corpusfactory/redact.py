"""Keep secrets out of messages and logs (reliability.md, scenario 12).

Secrets are the values of settings whose name says so (``kafka.sasl_password``,
``milvus.token``, ``serving.api_key``, ``*.openai_api_key``, ...) and the passwords
inside URIs (``http://user:password@host:19530``). Three tools:

* ``redact_uri(uri)``: the URI to print, its password (and secret query parameters)
  replaced by ``***``; scheme, user, host, port and path stay readable;
* ``secret_values(settings)`` and ``secret_values_in(data)``: every secret value in a
  ``Settings`` object or in the raw mapping it is built from;
* ``redact_text(text, secrets)``: ``text`` with those values, and any password of a URI
  in it, replaced by ``***`` — the last-resort scrub of a message before it is shown.

``RedactingFormatter`` applies ``redact_text`` to every formatted log line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel

MASK = "***"

# Name parts that make a setting a secret. "token" must be a whole part: max_tokens is not.
_SECRET_PARTS = {"password", "passwd", "pwd", "secret", "token", "apikey", "credentials"}
# scheme://user:password@host — the password runs to the last "@" of the word.
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)\S+@(?=[^\s@/]+)")


def is_secret_name(name: str) -> bool:
    """True for a setting (or query parameter) name that holds a secret."""
    parts = [p for p in re.split(r"[^a-z0-9]+", name.lower()) if p]
    return bool(_SECRET_PARTS.intersection(parts)) or (
        "key" in parts and parts.index("key") > 0 and parts[parts.index("key") - 1] == "api"
    )


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user info and its secret query parameters masked.

    ``http://root:Milvus@host:19530/db?token=x`` -> ``http://root:***@host:19530/db?token=***``.
    A string that is not a URI with a scheme comes back unchanged.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:  # malformed (e.g. a bad IPv6 literal): mask what looks like a password
        return _URI_PASSWORD.sub(lambda m: m["head"] + MASK + "@", uri)
    if not parts.scheme or not parts.netloc:
        return uri
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")  # a password may itself hold "@"
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _uri_secrets(value: str) -> set[str]:
    """The password and secret query values inside a URI string."""
    out: set[str] = set()
    try:
        parts = urlsplit(value)
    except ValueError:
        return out
    if not parts.scheme or not parts.netloc:
        return out
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        out.add(userinfo.partition(":")[2])
    out.update(v for k, v in parse_qsl(parts.query) if is_secret_name(k))
    return out


def _collect(value: Any, name: str, out: set[str]) -> None:
    if isinstance(value, BaseModel):
        for field in type(value).model_fields:
            _collect(getattr(value, field), field, out)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect(item, str(key), out)
    elif isinstance(value, list | tuple):
        for item in value:
            _collect(item, name, out)
    elif value is not None and is_secret_name(name):
        text = str(value)
        out.add(text)
        if ":" in text:  # a Milvus token "user:password": the password alone too
            out.add(text.partition(":")[2])
    elif isinstance(value, str) and "://" in value:
        out.update(_uri_secrets(value))


def secret_values(settings: BaseModel) -> set[str]:
    """Every secret value held by ``settings`` (non-empty strings)."""
    out: set[str] = set()
    _collect(settings, "", out)
    return {s for s in out if s}


def secret_values_in(data: Any) -> set[str]:
    """Every secret value in raw settings data (mappings, lists, scalars)."""
    out: set[str] = set()
    _collect(data, "", out)
    return {s for s in out if s}


def redact_value(value: Any, name: str = "") -> Any:
    """A copy of raw settings data that is safe to print: secret values masked, URIs
    redacted. ``name`` is the setting the value belongs to."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v, name) for v in value]
    if value is not None and is_secret_name(name):
        return MASK
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every value of ``secrets`` (also as ``repr``/JSON escapes it) and
    every password of a URI in it replaced by ``***``."""
    variants: set[str] = set()
    for secret in secrets:
        if secret:
            variants.update({secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]})
    for variant in sorted(variants, key=len, reverse=True):  # longest first: no half-masks
        if variant:
            text = text.replace(variant, MASK)
    return _URI_PASSWORD.sub(lambda m: m["head"] + MASK + "@", text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines (tracebacks included) pass through ``redact_text``.

    ``secrets`` is read at each call, so values learnt later (the settings are
    loaded after logging is set up) are masked from then on."""

    def __init__(self, fmt: str | None = None, secrets: set[str] | None = None) -> None:
        super().__init__(fmt)
        self.secrets: set[str] = secrets if secrets is not None else set()

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self.secrets)
