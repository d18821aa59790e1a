"""The OpenAI-compatible HTTP server: ``create_app``, ``run_server``, ``ModelRegistry``.

Run it: ``python -m serving.server --model DIR_OR_GGUF`` (see ``__main__.py``).
"""

from __future__ import annotations

from serving.server.app import create_app, run_server
from serving.server.registry import Lease, ModelRegistry, NoModelError
from serving.server.security import UnsafeBindError, check_bind, is_loopback

__all__ = [
    "Lease",
    "ModelRegistry",
    "NoModelError",
    "UnsafeBindError",
    "check_bind",
    "create_app",
    "is_loopback",
    "run_server",
]
