"""The web chat page (``serving/server/static/chat.html``) in headless Chromium.

A real uvicorn server with an API key serves the demo generator (transformers); Playwright
drives the system Chromium (``make system`` installs it; Playwright's own browser
download is never used). The browser opens ``/`` with the key as its HTTP Basic
password; the page's key field carries it to the API as a bearer token.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_web_chat.py
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, Request, Response, sync_playwright

from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.settings import ServingSettings
from serving.backends.transformers_backend import TransformersBackend
from serving.server import ModelRegistry
from tests.unit.server_util import serve

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

KEY = "web-s3cret"
MODEL_ID = "demo-web"
CHAT_PATH = "/v1/chat/completions"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Records the length of the newest assistant bubble's text at every change of the log.
RECORD_LENGTHS = """() => {
  window.cfLengths = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll("#log .assistant");
    if (bubbles.length) window.cfLengths.push(bubbles[bubbles.length - 1].textContent.length);
  }).observe(document.getElementById("log"),
             { childList: true, subtree: true, characterData: true });
}"""


@pytest.fixture(scope="module")
def url(demo_models: DemoModels) -> Iterator[str]:
    """A real server on a loopback socket bound here, with the API key set."""
    backend = TransformersBackend(demo_models.generator, model_id=MODEL_ID)
    settings = ServingSettings(api_key=KEY, max_tokens=64)
    with serve(ModelRegistry(backend), settings) as base:
        yield base


@contextmanager
def chat_page(url: str) -> Iterator[Page]:
    """The chat page in headless Chromium, opened with the key as the Basic password."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium is not installed (no 'chromium' on PATH, no {CHROMIUM}): the web chat "
            "page is tested in it. Run `make system` to install it."
        )
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except PlaywrightError as exc:
            pytest.fail(f"Chromium at {CHROMIUM} does not start ({exc}); run `make system`")
        try:
            context = browser.new_context(http_credentials={"username": "me", "password": KEY})
            page = context.new_page()
            page.set_default_timeout(30_000)
            response = page.goto(f"{url}/")
            assert response is not None and response.status == 200
            yield page
        finally:
            browser.close()


def chat_requests(page: Page) -> list[dict[str, Any]]:
    """The JSON bodies of the page's chat requests, appended as they are sent."""
    bodies: list[dict[str, Any]] = []

    def seen(request: Request) -> None:
        if request.method == "POST" and request.url.endswith(CHAT_PATH):
            body = request.post_data_json
            assert isinstance(body, dict), request.post_data
            bodies.append(body)

    page.on("request", seen)
    return bodies


def send(page: Page, text: str, *, enter: bool = False) -> None:
    """Type ``text`` and send it; return once the page has taken the whole reply (or error)."""
    before = page.locator("#log .msg").count()
    page.fill("#input", text)
    if enter:
        page.press("#input", "Enter")
    else:
        page.click("#send")
    page.wait_for_function(
        "(n) => document.querySelectorAll('#log .msg').length === n + 2 "
        "&& !document.getElementById('send').disabled",
        arg=before,
    )


def last_bubble(page: Page) -> tuple[str, str]:
    """(class, text) of the newest message bubble."""
    bubble = page.locator("#log .msg").last
    return bubble.get_attribute("class") or "", bubble.text_content() or ""


def test_page_streams_the_greedy_reply_keeps_history_and_resets(url: str) -> None:
    with chat_page(url) as page:
        # The page's own /v1/models call went through with the browser's Basic password.
        page.wait_for_function(f"document.getElementById('model').textContent === {MODEL_ID!r}")
        bodies = chat_requests(page)
        content_types: list[str] = []

        def answered(response: Response) -> None:
            if response.url.endswith(CHAT_PATH):
                content_types.append(response.headers.get("content-type", ""))

        page.on("response", answered)
        page.fill("#key", KEY)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "48")
        page.evaluate(RECORD_LENGTHS)

        first = "Ciao, come stai?"
        send(page, first)
        kind, reply = last_bubble(page)
        assert kind == "msg assistant" and reply
        assert content_types == ["text/event-stream; charset=utf-8"]
        # Tokens streamed in: the bubble showed at least two partial texts before the whole.
        lengths: list[int] = page.evaluate("window.cfLengths")
        partial = sorted({n for n in lengths if 0 < n < len(reply)})
        assert len(partial) >= 2, f"no streaming seen: lengths {lengths}, reply {len(reply)}"
        assert lengths[-1] == len(reply)

        sent = bodies[0]
        assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 48
        assert sent["model"] == MODEL_ID
        assert sent["messages"] == [{"role": "user", "content": first}]
        # The streamed text is what the server answers to the same request, whole.
        whole = httpx.post(
            f"{url}{CHAT_PATH}",
            json={**sent, "stream": False},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert whole.status_code == 200
        assert whole.json()["choices"][0]["message"]["content"] == reply

        # The second request carries the first exchange (sent with Enter this time).
        second = "E che cosa fai oggi?"
        send(page, second, enter=True)
        kind, reply2 = last_bubble(page)
        assert kind == "msg assistant" and reply2
        assert bodies[1]["messages"] == [
            {"role": "user", "content": first},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": second},
        ]

        # Reset empties the log and the history: the next request has only its message.
        page.click("#reset")
        assert page.locator("#log .msg").count() == 0
        third = "Raccontami una storia."
        send(page, third)
        assert bodies[2]["messages"] == [{"role": "user", "content": third}]
        assert len(bodies) == 3


def test_wrong_key_shows_an_error_and_drops_the_failed_turn(url: str) -> None:
    with chat_page(url) as page:
        bodies = chat_requests(page)
        page.fill("#key", "not-the-key")
        page.fill("#temperature", "0")
        started = time.monotonic()
        send(page, "Ciao?")  # returns once the page has settled: it does not hang
        assert time.monotonic() - started < 15
        kind, text = last_bubble(page)
        assert kind == "msg error"
        assert "wrong API key" in text

        # With the right key the conversation goes on without the refused turn.
        page.fill("#key", KEY)
        send(page, "Come stai?")
        kind, reply = last_bubble(page)
        assert kind == "msg assistant" and reply
        assert [b["messages"] for b in bodies] == [
            [{"role": "user", "content": "Ciao?"}],
            [{"role": "user", "content": "Come stai?"}],
        ]
