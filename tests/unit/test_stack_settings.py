"""``stack.write_settings``: the settings file every service process is given holds the
passwords, so only its owner may read it (mode 0600), from the moment it exists."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corpusfactory.settings import Settings, load_settings
from corpusfactory.tools.stack import write_settings

PASSWORD = "kafka-pw-5f1e"
API_KEY = "serving-key-93ab"


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that lets every new file be world-readable: 0600 must not come from it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        environ={},
        overrides={
            "state_dir": str(tmp_path / "state"),
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "factory",
                "sasl_password": PASSWORD,
            },
            "serving": {"api_key": API_KEY},
        },
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_settings_file_is_readable_by_its_owner_only(tmp_path: Path, open_umask: None) -> None:
    settings = _settings(tmp_path)
    path = settings.state_path / "run" / "settings.yaml"
    assert write_settings(settings, path) == path
    assert _mode(path) == 0o600
    # It reproduces the settings, secrets included (the processes need them).
    again = load_settings(path, environ={})
    assert again.kafka.sasl_password == PASSWORD
    assert again.serving.api_key == API_KEY
    assert again.state_path == settings.state_path
    assert [p.name for p in path.parent.iterdir()] == ["settings.yaml"]  # no temp file left


def test_an_existing_readable_file_is_replaced_by_a_private_one(
    tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("old: true\n", encoding="utf-8")
    path.chmod(0o644)
    write_settings(_settings(tmp_path), path)
    assert _mode(path) == 0o600
    assert PASSWORD in path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["settings.yaml"]


def test_each_process_starts_with_its_own_settings_file(tmp_path: Path) -> None:
    """Two processes on one state directory with other settings (a replaying scorer
    beside the stack's): each one's restart runs with its own settings. Both files
    once shared one path, so a restarted admitter took the replayer's app id."""
    from corpusfactory.tools.stack import ServiceProcess

    main = _settings(tmp_path)
    other = main.model_copy(deep=True)
    other.worker.app_id = main.worker.app_id + "-replay"
    first = ServiceProcess(main, ["--version"], "admitter")
    second = ServiceProcess(other, ["--version"], "scorer-replay")
    assert first.config != second.config
    for proc in (first, second, first):  # the first one started again, after the other
        proc.start()
        assert proc.proc is not None and proc.proc.wait(timeout=120) is not None
        assert load_settings(proc.config, environ={}).worker.app_id == proc.settings.worker.app_id
    assert load_settings(first.config, environ={}).worker.app_id == main.worker.app_id
