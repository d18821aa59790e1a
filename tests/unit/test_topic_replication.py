"""How many replicas the contract topics get, and how many must hold a write."""

from __future__ import annotations

import pytest

from corpusfactory.errors import ConfigError
from corpusfactory.kafka_clients import majority_of, topic_replication
from corpusfactory.settings import Settings, load_settings


def _settings(**kafka: object) -> Settings:
    return load_settings(None, environ={}, overrides={"kafka": kafka})


def test_majority() -> None:
    assert [majority_of(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("brokers", "expected"),
    [(1, (1, 1)), (2, (2, 2)), (3, (3, 2)), (5, (3, 2)), (0, (1, 1))],
)
def test_unset_follows_the_cluster(brokers: int, expected: tuple[int, int]) -> None:
    # min(3, brokers) replicas, a majority of them in sync; never fewer than one.
    assert topic_replication(_settings(), brokers) == expected


def test_set_values_win_over_the_cluster_size() -> None:
    assert topic_replication(_settings(replication_factor=2), 5) == (2, 2)
    assert topic_replication(_settings(min_insync_replicas=3), 5) == (3, 3)
    assert topic_replication(_settings(replication_factor=4, min_insync_replicas=1), 1) == (4, 1)


def test_min_isr_above_the_replicas_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(3\) exceeds replication_factor"):
        _settings(replication_factor=2, min_insync_replicas=3)
    # Set alone, it is checked against the replicas the cluster allows.
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(2\) exceeds the replication"):
        topic_replication(_settings(min_insync_replicas=2), 1)


def test_values_below_one_are_refused() -> None:
    with pytest.raises(ConfigError, match="replication_factor"):
        _settings(replication_factor=0)
    with pytest.raises(ConfigError, match="min_insync_replicas"):
        _settings(min_insync_replicas=0)
