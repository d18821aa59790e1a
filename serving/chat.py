"""``corpusfactory chat``: talk to the newest quantized build on a CPU, in the terminal.

The model is the newest published GGUF build of ``serving.quant`` (Q4_K_M by default),
or ``--model PATH`` (a ``.gguf`` file, or a Hugging Face directory for full precision),
run in-process with llama.cpp. Replies stream token by token; the history is kept and
sent with every turn (the oldest turns are dropped when it no longer fits the context,
as the server does). ``/reset`` forgets the history, ``/exit`` (or end of input) quits.
The prompt is the training chat format (``[|Umano|]`` / ``[|Assistente|]``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from corpusfactory.chatformat import ChatFormat
from corpusfactory.errors import UsageError
from corpusfactory.settings import Settings
from serving.backends import Backend, GenerationParams, load_backend
from serving.follow import newest
from serving.server.prompts import ReplyTidier, build_chat_prompt, chat_stops

HELP = "/reset forgets the conversation, /exit quits."


def open_model(settings: Settings, model: str | None) -> Backend:
    if model is None:
        found = newest(settings, "gguf")
        if found is None:
            raise UsageError(
                f"no published {settings.serving.quant} build in {settings.builds_path}: "
                "run `corpusfactory build`, or pass --model PATH"
            )
        model_id, path = found
    else:
        path = Path(model)
        model_id = path.stem if path.is_file() else path.name
        if not path.exists():
            raise UsageError(f"--model {model}: no such file or directory")
    if path.suffix == ".gguf":
        return load_backend("gguf", path, settings.serving, model_id=model_id)
    return load_backend("full", path, settings.serving, model_id=model_id)


def reply(
    backend: Backend,
    history: list[tuple[str, str]],
    fmt: ChatFormat,
    params: GenerationParams,
    out: TextIO,
) -> str:
    """Stream the assistant's answer to ``history`` (ending with a user turn) to ``out``."""
    budget = max(16, backend.n_ctx - params.max_tokens)  # leave room for the reply
    prompt = build_chat_prompt(history, fmt, backend.count_tokens, budget)
    tidy = ReplyTidier()
    text = ""
    with backend.generate_stream(prompt.text, params) as stream:
        for piece in stream:
            shown = tidy.feed(piece)
            text += shown
            out.write(shown)
            out.flush()
    out.write("\n")
    return text


def run_chat(
    settings: Settings,
    model: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> int:
    fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)
    params = GenerationParams(
        max_tokens=max_tokens or settings.serving.max_tokens,
        temperature=settings.serving.temperature if temperature is None else temperature,
        top_p=0.95,
        stop=chat_stops(fmt, ()),
    )
    backend = open_model(settings, model)
    history: list[tuple[str, str]] = []
    stdout.write(f"chatting with {backend.id} ({backend.kind}). {HELP}\n")
    try:
        while True:
            stdout.write("> ")
            stdout.flush()
            line = stdin.readline()
            if not line or line.strip() == "/exit":
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                history.clear()
                stdout.write("(conversation reset)\n")
                continue
            if text.startswith("/"):
                stdout.write(f"unknown command {text.split()[0]}. {HELP}\n")
                continue
            history.append(("user", text))
            history.append(("assistant", reply(backend, history, fmt, params, stdout)))
    finally:
        backend.close()
    return 0
