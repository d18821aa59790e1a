"""Serve one model: ``python -m serving.server --model PATH [--backend full|gguf]``.

Settings come from ``--config FILE`` and ``CORPUSFACTORY_SERVING__*`` variables
(host, port, api_key, n_ctx, ...); the flags below override them. A directory is
served in full precision (vLLM if installed, else transformers), a ``.gguf`` file
by llama.cpp. Following new snapshots is wired separately (registry.load).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from corpusfactory.chatformat import ChatFormat
from corpusfactory.errors import CorpusFactoryError
from corpusfactory.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__)
    ap.add_argument("--model", required=True, help="A model directory or a .gguf file.")
    ap.add_argument("--config", help="YAML settings profile.")
    ap.add_argument("--backend", choices=["full", "gguf"], help="Default: from the path.")
    ap.add_argument("--model-id", help="The id clients see (default: the file/directory name).")
    ap.add_argument("--host", help="Address to bind (default serving.host, 127.0.0.1).")
    ap.add_argument("--port", type=int, help="Port (default serving.port, 8000).")
    ap.add_argument("--log-level", default="info", help="Python logging level.")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from serving.backends import load_backend
    from serving.server.app import run_server
    from serving.server.registry import ModelRegistry
    from serving.server.security import check_bind

    try:
        overrides: dict[str, Any] = {}
        for name in ("host", "port"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        settings = load_settings(
            args.config, overrides={"serving": overrides} if overrides else None
        )
        serving = settings.serving
        check_bind(serving.host, serving.api_key)  # before minutes of model loading
        kind: Literal["full", "gguf"] = args.backend or (
            "gguf" if Path(args.model).suffix == ".gguf" else "full"
        )
        registry = ModelRegistry(load_backend(kind, args.model, serving, model_id=args.model_id))
        fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)
        run_server(serving, registry, chat_format=fmt, log_level=args.log_level)
    except CorpusFactoryError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
