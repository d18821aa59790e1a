"""Settings: sources, precedence, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from corpusfactory.errors import ConfigError
from corpusfactory.settings import JudgeSettings, load_settings

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_profile_parses(path: Path) -> None:
    s = load_settings(path, environ={})
    assert 0 < s.admission.similarity_threshold < 1
    assert s.producer.min_messages <= s.producer.max_messages


def test_shipped_profiles_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "paper.yaml"}


def test_defaults_follow_the_paper() -> None:
    s = load_settings(None, environ={})
    assert s.admission.similarity_threshold == 0.9
    assert s.admission.nll_threshold == 2.0
    assert (s.producer.min_messages, s.producer.max_messages) == (4, 10)
    assert (s.producer.user_tag, s.producer.assistant_tag) == ("[|Umano|]", "[|Assistente|]")


def test_precedence_file_then_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("admission:\n  nll_threshold: 1.5\n  similarity_threshold: 0.8\n")
    env = {
        "CORPUSFACTORY_ADMISSION__NLL_THRESHOLD": "1.8",
        "KAFKA_BOOTSTRAP_SERVERS": "h1:9092,h2:9092",
        "MILVUS_URI": "http://milvus:19530",
        "CORPUSFACTORY_PRODUCER__GENERATION__TEMPERATURE": "0.5",
        "CORPUSFACTORY_CACHE": "/somewhere",  # not a setting: ignored
    }
    s = load_settings(cfg, environ=env)
    assert s.admission.nll_threshold == 1.8
    assert s.admission.similarity_threshold == 0.8
    assert s.kafka.bootstrap_servers == "h1:9092,h2:9092"
    assert s.milvus.uri == "http://milvus:19530"
    assert s.producer.generation.temperature == 0.5


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "admission:\n  similarity_threshold: 1.5\n  nll_threshold: -1\n"
        "producer:\n  min_messages: 1\n  backend: gpt\n"
        "kafka:\n  partitions: 0\n  bogus: 1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    text = str(err.value)
    for where in (
        "admission.similarity_threshold",
        "admission.nll_threshold",
        "producer.min_messages",
        "producer.backend",
        "kafka.partitions",
        "kafka.bogus",
    ):
        assert where in text, where
    assert len(err.value.problems) == 6


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="min_messages must not exceed max_messages"):
        load_settings(
            None, environ={}, overrides={"producer": {"min_messages": 8, "max_messages": 5}}
        )
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_settings(None, environ={}, overrides={"kafka": {"security_protocol": "SASL_SSL"}})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("admission: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(top, environ={})


def test_unknown_environment_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"admission\.nll_treshold"):
        load_settings(None, environ={"CORPUSFACTORY_ADMISSION__NLL_TRESHOLD": "1"})


def test_topic_prefix() -> None:
    s = load_settings(None, environ={}, overrides={"kafka": {"topic_prefix": "x."}})
    assert s.topic("turns.candidates") == "x.turns.candidates"


def test_evaluation_settings_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            None,
            environ={},
            overrides={
                "evaluation": {
                    "tasks": ["squad_it", "ami2020"],
                    "evalita": {"x": {"train": "a", "test": "b"}},
                }
            },
        )
    text = str(err.value)
    assert "['ami2020'] need evalita" in text
    assert "unknown evalita tasks ['x']" in text


def test_judge_section_defaults_off_and_is_the_library_s_settings() -> None:
    from streams import judge

    s = load_settings(None, environ={})
    assert isinstance(s.judge, judge.JudgeSettings)
    assert judge.JudgeSettings is JudgeSettings  # re-exported by streams.judge
    assert (s.judge.enabled, s.judge.threshold, s.judge.on_unparsed) == (False, 3.0, "reject")


def test_judge_settings_from_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "j.yaml"
    cfg.write_text(
        "judge:\n  enabled: true\n  backend: transformers\n  model: demo:generator\n"
        "  template: '{instruction} => {response}'\n"
    )
    s = load_settings(cfg, environ={"CORPUSFACTORY_JUDGE__THRESHOLD": "4.5"})
    assert (s.judge.enabled, s.judge.model, s.judge.threshold) == (True, "demo:generator", 4.5)
    assert s.judge.template == "{instruction} => {response}"


def test_judge_problems_name_their_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            None,
            environ={},
            overrides={
                "judge": {"enabled": True, "threshold": 7, "on_unparsed": "maybe", "bogus": 1}
            },
        )
    text = str(err.value)
    for where in ("judge.threshold", "judge.on_unparsed", "judge.bogus"):
        assert where in text, where
    with pytest.raises(ConfigError, match=r"judge\.enabled needs judge\.model"):
        load_settings(None, environ={}, overrides={"judge": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"judge\.template: .*lacks the placeholder"):
        load_settings(None, environ={}, overrides={"judge": {"template": "only {response}"}})
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=r"judge\.template: cannot read the judge template"):
        load_settings(
            None,
            environ={},
            overrides={"judge": {"enabled": True, "model": "m", "template": str(missing)}},
        )
    # A template file is read (and checked) only when the judge is on.
    assert load_settings(None, environ={}, overrides={"judge": {"template": str(missing)}})
    good = tmp_path / "t.txt"
    good.write_text("Q: {instruction}\nA: {response}\nVoto:", encoding="utf-8")
    on = {"judge": {"enabled": True, "model": "m", "template": str(good)}}
    assert load_settings(None, environ={}, overrides=on).judge.template == str(good)
