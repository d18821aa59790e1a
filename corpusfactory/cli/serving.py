"""The serving commands of ``corpusfactory``: serve, chat.

``serve`` runs the OpenAI-compatible server on the newest published model and swaps
to newer ones as they are announced (``serving.follow``); ``chat`` is the terminal chat
with the newest quantized build.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpusfactory.settings import Settings

log = logging.getLogger(__name__)
SettingsFn = Callable[[argparse.Namespace], Settings]


def cmd_serve(args: argparse.Namespace, s: Settings) -> int:
    from corpusfactory.chatformat import ChatFormat
    from corpusfactory.engines.broker import resolve_bootstrap
    from corpusfactory.errors import BrokerError
    from serving.backends import load_backend
    from serving.follow import ModelFollower
    from serving.server.app import run_server
    from serving.server.registry import ModelRegistry
    from serving.server.security import check_bind

    kind = args.backend or s.serving.backend
    check_bind(args.host or s.serving.host, args.api_key or s.serving.api_key)  # fail early
    registry = ModelRegistry()
    follower = None
    if args.model:
        path = Path(args.model)
        registry.swap(load_backend(kind, path, s.serving, model_id=path.stem or path.name))
    else:
        try:
            bootstrap: str | None = resolve_bootstrap(s, start_embedded=False)
        except BrokerError as exc:
            log.warning("no Kafka (%s): looking for new models on disk every 10 s", exc)
            bootstrap = None
        follower = ModelFollower(s, registry, kind, bootstrap)
        follower.refresh()
        if s.serving.follow:
            follower.start()
    fmt = ChatFormat(s.producer.user_tag, s.producer.assistant_tag)
    try:
        run_server(s.serving, registry, args.host, args.port, args.api_key, chat_format=fmt)
    finally:
        if follower is not None:
            follower.stop()
    return 0


def cmd_chat(args: argparse.Namespace, s: Settings) -> int:
    from serving.chat import run_chat

    return run_chat(s, args.model, max_tokens=args.max_tokens, temperature=args.temperature)


def add_commands(
    add: Callable[[str, Callable[[argparse.Namespace], int], str], Any], settings: SettingsFn
) -> None:
    def bind(fn: Callable[[argparse.Namespace, Settings], int]) -> Callable[..., int]:
        return lambda args: fn(args, settings(args))

    p = add("serve", bind(cmd_serve), "OpenAI-compatible server of the newest model.")
    p.add_argument(
        "--backend",
        choices=["full", "gguf"],
        help="full: the newest snapshot (vLLM if installed, else transformers); "
        "gguf: the newest published build of serving.quant (llama.cpp)",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, help="port (default serving.port, 8000)")
    p.add_argument("--api-key", help="required on every route but /health (also serving.api_key)")
    p.add_argument("--model", help="serve this model (a .gguf file or HF directory), no following")

    p = add("chat", bind(cmd_chat), "Chat in the terminal with the newest quantized build.")
    p.add_argument("--model", help="a .gguf file (or a HF directory); default: the newest build")
    p.add_argument("--max-tokens", type=int, help="reply length (default serving.max_tokens)")
    p.add_argument("--temperature", type=float, help="sampling (default serving.temperature)")
