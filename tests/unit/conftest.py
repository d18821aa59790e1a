"""Fixtures of the unit tests: the demo models, built once (or reused from the cache)."""

from __future__ import annotations

import os

# Unit tests never reach a model hub: every model they load is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads (torch's, llama.cpp's) that wait by sleeping, not spinning: read when
# libgomp loads, so before torch is imported. On a busy CPU the spinning made each
# llama.cpp evaluation of the tiny models take a second instead of milliseconds, and a
# torch step ten times longer with two threads than with one (test_gguf.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from corpusfactory.engines.models.demo import DemoModels, build_demo_models


@pytest.fixture(scope="session")
def demo_models() -> DemoModels:
    """The real demo models in the default cache (built on first use, ~2-3 min on 2 cores)."""
    return build_demo_models()
