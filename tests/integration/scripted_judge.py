"""A scripted OpenAI-compatible judge: ``POST /v1/completions`` answered from a script.

For each prompt of a request the server answers with the output of the first rule
whose text occurs in the prompt, or with the default output. It keeps every prompt it
was asked, so a test can tell which pairs were judged. It is a real HTTP server on
loopback: the scorer worker (another process) reaches it through the project's own
OpenAI-compatible generator, retries and all; only the model's judgement is scripted,
so the test knows each score in advance instead of asking the judge under test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedJudge:
    def __init__(self, rules: Sequence[tuple[str, str]], default: str) -> None:
        self.rules = list(rules)
        self.default = default
        self.prompts: list[str] = []
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self._reply(400, {"error": "body is not JSON"})
                    return
                if self.path.rstrip("/") != "/v1/completions":
                    self._reply(404, {"error": f"no route {self.path}"})
                    return
                prompts = body.get("prompt")
                prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
                choices = [
                    {"index": i, "text": judge.answer(p), "finish_reason": "stop"}
                    for i, p in enumerate(prompts)
                ]
                self._reply(200, {"object": "text_completion", "choices": choices})

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def answer(self, prompt: str) -> str:
        with self._lock:
            self.prompts.append(prompt)
        for needle, output in self.rules:
            if needle in prompt:
                return output
        return self.default

    def asked(self, text: str) -> int:
        """How many prompts so far contained ``text``."""
        with self._lock:
            return sum(text in p for p in self.prompts)

    def __enter__(self) -> ScriptedJudge:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
