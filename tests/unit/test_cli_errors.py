"""How the command line reports failures: exit codes by kind, one line, no secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from corpusfactory.cli.main import EXIT_UNEXPECTED, main, report_error
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.errors import (
    EXIT_INVALID,
    EXIT_SETUP,
    EXIT_UNAVAILABLE,
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    ContractError,
    ConversionError,
    CorpusFactoryError,
    GeneratorError,
    GeneratorUnavailableError,
    IndexUnavailableError,
    InputFileError,
    JavaMissingError,
    ModelError,
    SeedError,
    UsageError,
)
from tests.unit.test_secrets import KAFKA_PASSWORD, assert_no_secret

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evalita"


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a command leaves it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (BrokerUnavailableError("kafka down"), EXIT_UNAVAILABLE),
        (IndexUnavailableError("milvus timed out"), EXIT_UNAVAILABLE),
        (GeneratorUnavailableError("server 503"), EXIT_UNAVAILABLE),
        (BrokerError("no broker"), EXIT_SETUP),
        (JavaMissingError("no java"), EXIT_SETUP),
        (ModelError("cannot load"), EXIT_SETUP),
        (ConfigError(["kafka.partitions: must be >= 1"]), EXIT_INVALID),
        (UsageError("bad flags"), EXIT_INVALID),
        (ContractError("bad event"), EXIT_INVALID),
        (InputFileError("bad file"), EXIT_INVALID),
        (SeedError("no seeds"), EXIT_INVALID),
        (ConversionError("unsupported architecture"), EXIT_INVALID),
        (GeneratorError("refused"), EXIT_INVALID),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_errors_of_the_tree_exit_by_kind_in_one_message(
    exc: CorpusFactoryError, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_error(_raised(exc), debug=False) == code
    err = capsys.readouterr().err
    assert err == f"corpusfactory: error: {exc}\n"


def test_an_unexpected_error_is_one_line_and_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    exc = _raised(RuntimeError("the thing broke\nwith details below"))
    assert report_error(exc, debug=False) == EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("corpusfactory: unexpected error: RuntimeError: the thing broke;")
    assert "run with --log-level DEBUG for the traceback" in err
    # At DEBUG the traceback comes first, and the hint is left out.
    assert report_error(exc, debug=True) == EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "--log-level" not in err


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """A profile holding secrets, plus ``sections``."""
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "kafka": {
            "bootstrap_servers": "127.0.0.1:1",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "factory",
            "sasl_password": KAFKA_PASSWORD,
        },
        "milvus": {
            "uri": "http://root:milvus-pw-Z3k@127.0.0.1:1",
            "token": "root:milvus-token-R8m",
        },
        "serving": {"api_key": "serving-key-L2v"},
        "judge": {"openai_api_key": "sk-judge-K9t"},
        "producer": {"openai_api_key": "sk-producer-P4w"},
        "metrics": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_a_bad_setting_exits_2_without_traceback_or_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, kafka={"sasl_username": None}, serving={"quant": "Q6_K"})
    assert main(["snapshots", "list", "--config", str(config)]) == EXIT_INVALID
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("corpusfactory: error: invalid settings (2 problem(s)):")
    assert "kafka: " in err and "serving: " in err
    assert_no_secret(err)


def test_eval_run_on_a_sentipolc_file_in_another_layout(
    tmp_path: Path, demo_models: DemoModels, capsys: pytest.CaptureFixture[str]
) -> None:
    # The AMI test file given as SENTIPOLC's: a tab-separated file with another header.
    bad = tmp_path / "sentipolc_test.csv"
    bad.write_text((FIXTURES / "ami2020_test.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    evalita = {"train": str(FIXTURES / "sentipolc2014_train.csv"), "test": str(bad)}
    config = _config(
        tmp_path, evaluation={"tasks": ["sentipolc2014"], "evalita": {"sentipolc2014": evalita}}
    )
    argv = ["eval", "run", "--model", "base", "--tasks", "sentipolc2014", "--config", str(config)]
    assert main(argv) == EXIT_INVALID
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith(f"corpusfactory: error: {bad}:1: not a sentipolc2014 file")
    assert "comma-separated" in err and "'idtwitter'" in err
    assert_no_secret(err)


def test_eval_run_of_an_unknown_task_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    argv = ["eval", "run", "--model", "base", "--tasks", "haspeede", "--config", str(config)]
    assert main(argv) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith("corpusfactory: error: unknown evaluation tasks ['haspeede']")
    assert err.count("\n") == 1


def test_the_last_resort_scrub_masks_what_the_settings_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Loading the settings (any command) teaches the command line their secrets ...
    assert main(["snapshots", "list", "--config", str(_config(tmp_path))]) == 0
    capsys.readouterr()
    # ... so an error quoting one, from a library or our own code, never shows it.
    leaky = RuntimeError(
        f"auth failed for factory:{KAFKA_PASSWORD} on http://root:milvus-pw-Z3k@milvus:19530 "
        "(token root:milvus-token-R8m)"
    )
    assert report_error(_raised(leaky), debug=True) == EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert "Traceback" in err and "auth failed for factory:***" in err
    assert_no_secret(err)
    ours = InputFileError("bad key sk-judge-K9t in /srv/serving-key-L2v.txt")
    assert report_error(_raised(ours), debug=False) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err == "corpusfactory: error: bad key *** in /srv/***.txt\n"
