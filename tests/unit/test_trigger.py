"""The trigger policy: when a snapshot is due, by count, by time, or both."""

from __future__ import annotations

import pytest

from corpusfactory.errors import ConfigError
from corpusfactory.settings import TriggerSettings, load_settings
from training.trigger import TriggerPolicy

HOUR = 3600.0


def test_count_only_fires_at_exactly_n_and_above() -> None:
    p = TriggerPolicy(every_conversations=10, every_minutes=None)
    assert p.due(0, 0.0) is None
    assert p.due(9, 10 * HOUR) is None  # no timer: time alone never fires
    assert p.due(10, 0.0) == "count"  # exactly N
    assert p.due(11, 0.0) == "count"
    assert p.due(1000, 1e9) == "count"


def test_time_only_fires_at_exactly_t_minutes() -> None:
    p = TriggerPolicy(every_conversations=None, every_minutes=30.0)
    assert p.due(5, 30 * 60 - 0.001) is None
    assert p.due(5, 30 * 60) == "time"  # exactly T
    assert p.due(5, 30 * 60 + 1) == "time"
    assert p.due(10**6, 0.0) is None  # no count condition: many conversations alone never fire


def test_time_trigger_respects_the_min_conversations_floor() -> None:
    p = TriggerPolicy(every_conversations=None, every_minutes=1.0, min_conversations=3)
    assert p.due(0, 10 * HOUR) is None
    assert p.due(2, 10 * HOUR) is None
    assert p.due(3, 10 * HOUR) == "time"  # exactly the floor
    # The default floor is one: a timer with nothing new does not train.
    q = TriggerPolicy(every_conversations=None, every_minutes=1.0)
    assert q.due(0, 10 * HOUR) is None
    assert q.due(1, 60.0) == "time"


def test_both_conditions_count_wins_and_either_fires() -> None:
    p = TriggerPolicy(every_conversations=100, every_minutes=60.0, min_conversations=5)
    assert p.due(4, 2 * HOUR) is None  # timer elapsed, under the floor, under the count
    assert p.due(5, 2 * HOUR) == "time"
    assert p.due(99, 59 * 60) is None
    assert p.due(100, 59 * 60) == "count"
    # Both satisfied: the count is reported.
    assert p.due(100, 2 * HOUR) == "count"
    # The floor applies to the timer only: the count fires regardless of it.
    r = TriggerPolicy(every_conversations=2, every_minutes=60.0, min_conversations=5)
    assert r.due(2, 0.0) == "count"


def test_seconds_until_time_trigger() -> None:
    p = TriggerPolicy(every_conversations=10, every_minutes=2.5)
    assert p.seconds_until_time_trigger(0.0) == pytest.approx(150.0)
    assert p.seconds_until_time_trigger(100.0) == pytest.approx(50.0)
    assert p.seconds_until_time_trigger(150.0) == 0.0
    assert p.seconds_until_time_trigger(1e6) == 0.0  # never negative
    assert TriggerPolicy(10, None).seconds_until_time_trigger(0.0) is None


def test_from_settings_copies_every_field() -> None:
    s = TriggerSettings(every_conversations=7, every_minutes=12.5, min_conversations=4)
    assert TriggerPolicy.from_settings(s) == TriggerPolicy(7, 12.5, 4)
    # Defaults: count only.
    d = TriggerPolicy.from_settings(TriggerSettings())
    assert (d.every_conversations, d.every_minutes, d.min_conversations) == (100, None, 1)


def test_settings_with_both_conditions_unset_are_rejected() -> None:
    overrides = {"training": {"trigger": {"every_conversations": None, "every_minutes": None}}}
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={}, overrides=overrides)
    assert len(err.value.problems) == 1
    problem = err.value.problems[0]
    assert problem.startswith("training.trigger")
    assert "every_conversations" in problem and "every_minutes" in problem
    assert "set every_conversations, every_minutes, or both" in str(err.value)


def test_settings_with_both_conditions_unset_from_the_environment() -> None:
    env = {
        "CORPUSFACTORY_TRAINING__TRIGGER__EVERY_CONVERSATIONS": "",
        "CORPUSFACTORY_TRAINING__TRIGGER__EVERY_MINUTES": "",
    }
    with pytest.raises(ConfigError, match="every_conversations, every_minutes, or both"):
        load_settings(None, environ=env)


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ({"every_conversations": None, "every_minutes": 5}, (None, 5.0, 1)),
        ({"every_conversations": 3}, (3, None, 1)),
        ({"every_conversations": 3, "every_minutes": 0.5, "min_conversations": 2}, (3, 0.5, 2)),
    ],
)
def test_valid_trigger_settings_load(
    trigger: dict[str, object], expected: tuple[int | None, float | None, int]
) -> None:
    s = load_settings(None, environ={}, overrides={"training": {"trigger": trigger}})
    t = s.training.trigger
    assert (t.every_conversations, t.every_minutes, t.min_conversations) == expected


@pytest.mark.parametrize(
    ("trigger", "where"),
    [
        ({"every_conversations": 0}, "training.trigger.every_conversations"),
        ({"every_minutes": 0}, "training.trigger.every_minutes"),
        ({"min_conversations": 0}, "training.trigger.min_conversations"),
    ],
)
def test_out_of_range_trigger_values_are_rejected(trigger: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={}, overrides={"training": {"trigger": trigger}})
    assert any(p.startswith(where) for p in err.value.problems), err.value.problems
