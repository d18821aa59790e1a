"""No secret in a message (reliability.md, scenario 12): URIs, settings errors, the scrub."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.errors import ConfigError
from corpusfactory.redact import (
    RedactingFormatter,
    is_secret_name,
    redact_text,
    redact_uri,
    redact_value,
    secret_values,
)
from corpusfactory.settings import load_settings

# Distinct values, so a leak names its source.
KAFKA_PASSWORD = "kafka-pw-Q7x!"
MILVUS_PASSWORD = "milvus-pw-Z3k"
MILVUS_TOKEN = "root:milvus-token-R8m"
SERVING_KEY = "serving-key-L2v"
JUDGE_KEY = "sk-judge-K9t"
PRODUCER_KEY = "sk-producer-P4w"
SECRETS = [
    KAFKA_PASSWORD,
    MILVUS_PASSWORD,
    MILVUS_TOKEN,
    "milvus-token-R8m",
    SERVING_KEY,
    JUDGE_KEY,
    PRODUCER_KEY,
]


def assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"secrets {leaked} in: {text}"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://root:Milvus@localhost:19530", "http://root:***@localhost:19530"),
        ("https://u:p%40ss@milvus.example:443/db", "https://u:***@milvus.example:443/db"),
        ("http://u:p@ss@host:19530", "http://u:***@host:19530"),  # "@" in the password
        ("http://host:19530/db?token=abc&timeout=5", "http://host:19530/db?token=***&timeout=5"),
        ("http://user@host:19530", "http://user@host:19530"),  # no password: nothing to hide
        ("https://host:443", "https://host:443"),
        ("/var/lib/corpusfactory/index.db", "/var/lib/corpusfactory/index.db"),
        ("Milvus Lite", "Milvus Lite"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_secret_names() -> None:
    for name in ("sasl_password", "token", "api_key", "openai_api_key", "client_secret"):
        assert is_secret_name(name), name
    for name in ("max_tokens", "gate_max_tokens", "ssl_keyfile", "sasl_username", "uri"):
        assert not is_secret_name(name), name


def test_redact_text_masks_values_their_escapes_and_uri_passwords() -> None:
    quoted = 'pa"ss\\word'
    text = (
        f"login failed with {KAFKA_PASSWORD!r}; cfg={ {'p': quoted}!r}; "
        "index at 'http://root:hunter2@10.0.0.5:19530' down"
    )
    out = redact_text(text, [KAFKA_PASSWORD, quoted])
    assert KAFKA_PASSWORD not in out and "hunter2" not in out
    assert quoted not in out and repr(quoted)[1:-1] not in out
    assert "http://root:***@10.0.0.5:19530" in out and out.count("***") == 3


def _secret_data() -> dict[str, Any]:
    return {
        "kafka": {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "factory",
            "sasl_password": KAFKA_PASSWORD,
        },
        "milvus": {
            "uri": f"http://root:{MILVUS_PASSWORD}@milvus:19530",
            "token": MILVUS_TOKEN,
        },
        "serving": {"api_key": SERVING_KEY},
        "judge": {"openai_api_key": JUDGE_KEY},
        "producer": {"openai_api_key": PRODUCER_KEY},
    }


def test_secret_values_of_settings() -> None:
    settings = load_settings(None, environ={}, overrides=_secret_data())
    found = secret_values(settings)
    assert set(SECRETS) <= found
    assert "factory" not in found and "SASL_SSL" not in found
    shown = redact_value(settings)
    assert_no_secret(repr(shown))
    assert shown["milvus"]["uri"] == "http://root:***@milvus:19530"
    assert shown["kafka"]["sasl_username"] == "factory"


def test_settings_errors_never_show_a_secret() -> None:
    data = _secret_data()
    del data["kafka"]["sasl_username"]  # SASL incomplete: the error's input is the section
    data["judge"]["enabled"] = True  # without judge.model
    data["serving"]["quant"] = "Q6_K"  # not in serving.quants
    data["producer"].update(min_messages=6, max_messages=4)
    data["milvus"]["index_type"] = "HNSW"
    data["milvus"]["tokn"] = MILVUS_TOKEN  # a misspelt key: its value is never shown
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={}, overrides=data)
    message = str(caught.value)
    assert_no_secret(message)
    assert len(caught.value.problems) == 6
    for where in ("kafka:", "judge:", "serving:", "producer:", "milvus.index_type:"):
        assert where in message, where
    assert "milvus.tokn: unknown setting" in message
    assert "'sasl_password': '***'" in message  # the section is shown, its secret masked


def test_a_section_that_is_not_a_mapping_shows_its_uri_redacted() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={}, overrides={"milvus": f"http://u:{MILVUS_PASSWORD}@h:1"})
    assert_no_secret(str(caught.value))
    assert "http://u:***@h:1" in str(caught.value)


def test_yaml_errors_do_not_quote_the_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(f'kafka:\n  sasl_password: "{KAFKA_PASSWORD}\n  partitions: 2\n')
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+") as caught:
        load_settings(config, environ={})
    assert_no_secret(str(caught.value))


def test_secrets_from_the_environment_stay_strings_and_unquoted() -> None:
    env = {
        "CORPUSFACTORY_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "CORPUSFACTORY_KAFKA__SASL_MECHANISM": "PLAIN",
        "CORPUSFACTORY_KAFKA__SASL_USERNAME": "factory",
        # YAML would read these as a number and as a broken flow sequence.
        "CORPUSFACTORY_KAFKA__SASL_PASSWORD": "123456",
        "CORPUSFACTORY_SERVING__API_KEY": "[key: {x",
        # Not a secret, but not YAML either: taken as the string it is.
        "CORPUSFACTORY_PRODUCER__USER_TAG": "[|Utente: {",
    }
    settings = load_settings(None, environ=env)
    assert settings.kafka.sasl_password == "123456"
    assert settings.serving.api_key == "[key: {x"
    assert settings.producer.user_tag == "[|Utente: {"


def test_log_lines_and_tracebacks_are_scrubbed() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    known: set[str] = set()
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s", known))
    logger = logging.getLogger("test_secrets.scrub")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        known.add(SERVING_KEY)  # learnt after the handler was set up, as the CLI does
        try:
            raise ValueError(f"rejected key {SERVING_KEY}")
        except ValueError:
            logger.exception("calling http://u:%s@h:1 failed", MILVUS_PASSWORD)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "ERROR calling http://u:***@h:1 failed" in text
    assert "ValueError: rejected key ***" in text
    assert_no_secret(text)
