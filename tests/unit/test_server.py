"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback
port, the real demo generator (transformers, and llama.cpp on a GGUF converted from
it), and the official ``openai`` client.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_server.py
"""

from __future__ import annotations

import base64
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.settings import ServingSettings
from serving.backends import (
    Backend,
    BackendUnavailableError,
    StopCutter,
    load_backend,
    vllm_available,
)
from serving.backends.transformers_backend import TransformersBackend
from serving.server import ModelRegistry, UnsafeBindError, check_bind, run_server
from serving.server.prompts import ChatRequestError, ReplyTidier, build_chat_prompt
from tests.unit.server_util import serve, wait_for

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

KEY = "s3cret-key"
FMT = ChatFormat()
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Rispondi in italiano."},
    {"role": "user", "content": "Ciao, come stai?"},
]


# -- helpers -------------------------------------------------------------------------


def client(url: str, key: str | None = KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=120)


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    return 0.0


def stream_chat(c: OpenAI, **kwargs: Any) -> tuple[str, str | None, set[str], Any]:
    """(text, finish_reason, models seen, usage) of a streamed chat completion."""
    parts, models, finish, usage = [], set(), None, None
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        models.add(chunk.model)
        usage = chunk.usage or usage
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish, models, usage


def stream_completion(c: OpenAI, **kwargs: Any) -> tuple[str, str | None, int]:
    parts, finish, n = [], None, 0
    for chunk in c.completions.create(stream=True, **kwargs):
        if chunk.choices:
            n += 1
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish, n


@dataclass
class Served:
    url: str
    registry: ModelRegistry
    backend: Backend


@pytest.fixture(scope="module")
def served(demo_models: DemoModels) -> Iterator[Served]:
    backend = TransformersBackend(demo_models.generator, model_id="demo-a")
    registry = ModelRegistry(backend)
    with serve(registry, ServingSettings(api_key=KEY, max_tokens=32)) as url:
        yield Served(url, registry, backend)


# -- pure parts: stops, reply tidying, chat prompts, bind rule ------------------------


def test_stop_cutter_cuts_at_first_stop_whatever_the_split() -> None:
    text = "Va bene [|Umano| quasi, poi [|Umano|] e oltre"
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        cutter, out, stopped = StopCutter(["[|Umano|]", "\n\n"]), "", False
        for piece in pieces:
            emitted, stopped = cutter.feed(piece)
            out += emitted
            if stopped:
                break
        assert stopped and out == "Va bene [|Umano| quasi, poi "


def test_reply_tidier_strips_both_ends_of_a_stream() -> None:
    tidier = ReplyTidier()
    pieces = ["  ", " Ciao", " a te ", "\n", " e", "  ", "\n"]
    assert "".join(tidier.feed(p) for p in pieces) == "Ciao a te \n e"


def test_system_text_goes_to_the_first_kept_user_turn() -> None:
    msgs = [("system", "Sii breve."), ("user", "uno"), ("assistant", "due"), ("user", "tre")]
    prompt = build_chat_prompt(msgs, FMT, lambda s: len(s), budget=10_000)
    expected = FMT.prompt(
        [Message("user", "Sii breve.\nuno"), Message("assistant", "due"), Message("user", "tre")],
        "assistant",
    )
    assert prompt.text == expected and prompt.dropped_turns == 0
    # Too long for the budget: the oldest exchange goes, the system text stays.
    short = build_chat_prompt(msgs, FMT, lambda s: len(s), budget=len(expected) - 1)
    assert short.text == FMT.prompt([Message("user", "Sii breve.\ntre")], "assistant")
    assert short.dropped_turns == 2
    with pytest.raises(ChatRequestError):
        build_chat_prompt([("user", "a"), ("assistant", "b")], FMT, len, 10_000)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"]
)
def test_loopback_binds_without_key(host: str) -> None:
    check_bind(host, None)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "fe80::1", "::ffff:10.0.0.1", "srv", ""]
)
def test_non_loopback_needs_a_key(host: str) -> None:
    with pytest.raises(UnsafeBindError, match="API key"):
        check_bind(host, None)
    with pytest.raises(UnsafeBindError):
        check_bind(host, "")
    check_bind(host, KEY)  # allowed with a key
    # run_server checks before it binds anything.
    with pytest.raises(UnsafeBindError):
        run_server(ServingSettings(), ModelRegistry(), host=host, port=1)


# -- the server with the transformers backend -----------------------------------------


def test_models_and_chat_stream_equals_greedy(served: Served) -> None:
    c = client(served.url)
    assert [m.id for m in c.models.list().data] == ["demo-a"]

    whole = c.chat.completions.create(model="demo-a", messages=CHAT, temperature=0, max_tokens=24)
    text, finish, models, usage = stream_chat(
        c,
        model="demo-a",
        messages=CHAT,
        temperature=0,
        max_tokens=24,
        stream_options={"include_usage": True},
    )
    reply = whole.choices[0].message.content
    assert reply and reply == text and reply == reply.strip()
    assert finish == whole.choices[0].finish_reason in ("stop", "length")
    assert whole.model == "demo-a" and models == {"demo-a"}
    # The system message is part of the first user turn of the training format.
    prompt = FMT.prompt([Message("user", "Rispondi in italiano.\nCiao, come stai?")], "assistant")
    assert whole.usage is not None and usage is not None
    assert whole.usage.prompt_tokens == served.backend.count_tokens(prompt) == usage.prompt_tokens
    assert 1 <= whole.usage.completion_tokens <= 24
    if finish == "length":
        assert whole.usage.completion_tokens == 24
    assert whole.usage.completion_tokens == usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert "[|" not in reply and "\n\n" not in reply


def test_completions_both_modes_and_stop_strings(served: Served) -> None:
    c = client(served.url)
    prompt = "La capitale d'Italia"
    whole = c.completions.create(model="demo-a", prompt=prompt, temperature=0, max_tokens=20)
    text = whole.choices[0].text
    streamed, finish, n_chunks = stream_completion(
        c, model="demo-a", prompt=prompt, temperature=0, max_tokens=20
    )
    assert text and streamed == text and n_chunks > 2
    assert finish == whole.choices[0].finish_reason
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == served.backend.count_tokens(prompt)
    assert 1 <= whole.usage.completion_tokens <= 20

    # A stop string (several characters, so it spans streamed pieces) cuts the text.
    words = text.split()
    assert len(words) >= 4, text
    stop = f"{words[2]} {words[3]}"
    cut = text[: text.index(stop)]
    stopped = c.completions.create(
        model="demo-a", prompt=prompt, temperature=0, max_tokens=20, stop=[stop]
    )
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    s_text, s_finish, _ = stream_completion(
        c, model="demo-a", prompt=prompt, temperature=0, max_tokens=20, stop=stop
    )
    assert (s_text, s_finish) == (cut, "stop")


def test_seeded_sampling_repeats(served: Served) -> None:
    c = client(served.url)
    kw: dict[str, Any] = {"model": "m", "prompt": "Oggi", "max_tokens": 12, "temperature": 1.0}
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    assert a == b


def test_bad_requests_are_400_with_openai_errors(served: Served) -> None:
    c = client(served.url)
    with pytest.raises(openai.BadRequestError, match="last non-system message"):
        c.chat.completions.create(
            model="m", messages=[*CHAT, {"role": "assistant", "content": "Bene."}]
        )
    with pytest.raises(openai.BadRequestError, match="n=1"):
        c.chat.completions.create(model="m", messages=CHAT, n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="m", prompt="ciao " * 2000, max_tokens=4)


ROUTES = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/nothing-here"),
    ("GET", "/health/"),
]


def test_every_route_but_health_needs_the_key(served: Served) -> None:
    wrong_basic = "Basic " + base64.b64encode(b"user:wrong").decode()
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": wrong_basic}):
            resp = httpx.request(method, served.url + path, headers=headers, json={})
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json()["error"]["code"] == "invalid_api_key"
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    for call in (
        lambda c: c.models.list(),
        lambda c: c.chat.completions.create(model="m", messages=CHAT),
        lambda c: c.completions.create(model="m", prompt="x"),
    ):
        with pytest.raises(openai.AuthenticationError):
            call(client(served.url, key="wrong"))
    # The chat page: with the key as a bearer token, or as a browser's Basic password.
    basic = "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()
    for auth in (f"Bearer {KEY}", basic):
        page = httpx.get(f"{served.url}/", headers={"Authorization": auth})
        assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "Basic" in httpx.get(f"{served.url}/").headers["www-authenticate"]


def test_metrics_count_requests_by_route_and_status(served: Served) -> None:
    c = client(served.url)
    route = {"route": "/v1/chat/completions", "status": "200"}
    refused = {"route": "/v1/models", "status": "401"}
    before_ok = metric(served.url, "corpusfactory_serving_requests_total", route)
    before_401 = metric(served.url, "corpusfactory_serving_requests_total", refused)
    before_tokens = metric(served.url, "corpusfactory_serving_generated_tokens_total")
    c.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0)
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    assert metric(served.url, "corpusfactory_serving_requests_total", route) == before_ok + 1
    assert metric(served.url, "corpusfactory_serving_requests_total", refused) == before_401 + 1
    assert metric(served.url, "corpusfactory_serving_generated_tokens_total") > before_tokens
    assert (
        metric(
            served.url,
            "corpusfactory_serving_request_duration_seconds_count",
            {"route": "/v1/chat/completions"},
        )
        >= 1
    )
    info = {"model_id": "demo-a", "backend": "transformers"}
    assert metric(served.url, "corpusfactory_serving_model_info", info) == 1


def test_client_going_away_frees_the_model(served: Served) -> None:
    c = client(served.url)
    stream = c.completions.create(
        model="m", prompt="C'era una volta", max_tokens=400, temperature=0.8, stream=True
    )
    next(iter(stream))
    assert served.registry.active_leases >= 1
    stream.close()
    wait_for(lambda: served.registry.active_leases == 0, 30, "the lease to be released")


def test_no_model_yet_is_503_and_health_says_loading() -> None:
    with serve(ModelRegistry(), ServingSettings()) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "loading"}
        assert client(url).models.list().data == []
        with pytest.raises(openai.APIStatusError) as err:
            client(url).chat.completions.create(model="m", messages=CHAT)
        assert err.value.status_code == 503


# -- swapping the model under load ----------------------------------------------------


def test_swap_under_concurrent_streams_loses_no_request(demo_models: DemoModels) -> None:
    old = TransformersBackend(demo_models.generator, model_id="demo-a")
    new = TransformersBackend(demo_models.generator, model_id="demo-b")
    registry = ModelRegistry(old)
    with serve(registry, ServingSettings(api_key=KEY)) as url:
        c = client(url)
        pieces = [0] * 8  # content chunks received so far, per request
        results: dict[int, tuple[str, str | None, set[str]]] = {}
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            msgs: list[ChatCompletionMessageParam] = [
                {"role": "user", "content": f"Domanda numero {i}: dove abiti?"}
            ]
            parts, models, finish = [], set(), None
            try:
                stream = c.chat.completions.create(
                    model="demo-a", messages=msgs, max_tokens=48, stream=True
                )
                for chunk in stream:
                    models.add(chunk.model)
                    if chunk.choices:
                        if chunk.choices[0].delta.content:
                            parts.append(chunk.choices[0].delta.content)
                            pieces[i] += 1
                        finish = chunk.choices[0].finish_reason or finish
                results[i] = ("".join(parts), finish, models)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        # All 8 hold a lease on the old model (one generates, the others wait their turn)...
        wait_for(lambda: registry.active_leases == 8, 60, "8 requests in flight")
        # ... and one of them is half-way through its reply.
        wait_for(
            lambda: any(pieces[i] and i not in results for i in range(8)) or len(results) == 8,
            60,
            "a reply half-way",
        )
        retired = registry.swap(new)
        assert registry.current_id == "demo-b"
        assert not retired.done() and not old.closed  # still serving its requests

        fresh = c.chat.completions.create(model="demo-b", messages=CHAT, max_tokens=8)
        assert fresh.model == "demo-b"
        _, _, fresh_models, _ = stream_chat(c, model="x", messages=CHAT, max_tokens=8)
        assert fresh_models == {"demo-b"}
        assert [m.id for m in c.models.list().data] == ["demo-b"]

        for t in threads:
            t.join(timeout=180)
        assert not errors, errors
        assert sorted(results) == list(range(8))
        for _text, finish, models in results.values():
            assert models == {"demo-a"} and finish in ("stop", "length")
        # Closed once its last lease ended; had it closed earlier, the requests still
        # waiting for it would have failed ("closed") above.
        retired.result(timeout=30)
        assert old.closed and not new.closed
        wait_for(lambda: registry.active_leases == 0, 10, "every lease to be released")
        assert metric(url, "corpusfactory_serving_model_swaps_total") == 1
        assert metric(url, "corpusfactory_serving_model_info", {"model_id": "demo-b"}) == 1
    wait_for(lambda: new.closed, 30, "shutdown to close the served model")


def test_full_backend_without_vllm_is_transformers(demo_models: DemoModels) -> None:
    if vllm_available():
        pytest.skip("vLLM is installed here: load_backend would pick it")
    backend = load_backend("full", demo_models.generator, ServingSettings(n_ctx=256))
    try:
        assert backend.kind == "transformers" and backend.n_ctx == 256
    finally:
        backend.close()
    from serving.backends.vllm_backend import VLLMBackend

    with pytest.raises(BackendUnavailableError, match="pip install vllm"):
        VLLMBackend(str(demo_models.generator))


# -- the same server on llama.cpp -----------------------------------------------------


@pytest.fixture(scope="module")
def demo_gguf(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    convert = pytest.importorskip("serving.gguf.convert", reason="no GGUF converter")
    out = tmp_path_factory.mktemp("gguf") / "demo-f16.gguf"
    convert.convert_hf_to_gguf(demo_models.generator, out, "f16")
    return out


def test_llamacpp_backend_serves_the_same_api(demo_gguf: Path, served: Served) -> None:
    backend = load_backend("gguf", demo_gguf, ServingSettings(n_ctx=512, n_threads=2))
    assert backend.kind == "llama.cpp" and backend.id == "demo-f16"
    with serve(ModelRegistry(backend), ServingSettings(api_key=KEY)) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["demo-f16"]
        whole = c.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=16)
        text, finish, models, usage = stream_chat(
            c,
            model="m",
            messages=CHAT,
            temperature=0,
            max_tokens=16,
            stream_options={"include_usage": True},
        )
        assert whole.choices[0].message.content == text and text
        assert finish == whole.choices[0].finish_reason and models == {"demo-f16"}
        assert whole.usage == usage and usage is not None
        assert 1 <= usage.completion_tokens <= 16

        prompt = "La capitale d'Italia"
        done = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16)
        streamed, s_finish, _ = stream_completion(
            c, model="m", prompt=prompt, temperature=0, max_tokens=16
        )
        assert done.choices[0].text == streamed and s_finish == done.choices[0].finish_reason
        assert done.usage is not None
        assert done.usage.prompt_tokens == served.backend.count_tokens(prompt)
        if s_finish == "length":
            assert done.usage.completion_tokens == 16
        # An F16 build decodes greedily like the full-precision model it came from.
        reference = client(served.url).completions.create(
            model="m", prompt=prompt, temperature=0, max_tokens=16
        )
        assert done.choices[0].text == reference.choices[0].text
    wait_for(lambda: backend.closed, 30, "shutdown to close the llama.cpp model")
