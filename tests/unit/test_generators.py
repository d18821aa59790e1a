"""Generator backends: the factory, the OpenAI-compatible client, the transformers backend."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.errors import GeneratorError, GeneratorUnavailableError
from corpusfactory.settings import GenerationSettings, ProducerSettings
from corpusfactory.text import cut_at_stop
from producers.generators import factory
from producers.generators.base import Generator, derive_seed
from producers.generators.factory import make_generator
from producers.generators.openai_compat import OpenAICompatGenerator, parse_retry_after

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------
# base


def test_cut_at_stop_takes_the_earliest_stop() -> None:
    assert cut_at_stop("ciao [|Umano|] come", ["[|Umano|]", "[|"]) == "ciao "
    assert cut_at_stop("a\n\nb [|x", ["[|", "\n\n"]) == "a"
    assert cut_at_stop("nessuno stop", ["[|", ""]) == "nessuno stop"
    assert cut_at_stop("", ["x"]) == ""


def test_derive_seed_is_stable_and_varies_with_counter() -> None:
    assert derive_seed(7, 0) == derive_seed(7, 0)
    seeds = {derive_seed(7, i) for i in range(100)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(7, 0) != derive_seed(8, 0)


def test_missing_backend_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = factory.importlib.util.find_spec

    def fake_find_spec(name: str, *args: Any) -> Any:
        return None if name == "vllm" else real(name, *args)

    monkeypatch.setattr(factory.importlib.util, "find_spec", fake_find_spec)
    settings = ProducerSettings(backend="vllm")
    with pytest.raises(GeneratorError, match=r"pip install vllm"):
        make_generator(settings, "some/model", "cuda")


def test_make_generator_openai_uses_the_settings() -> None:
    settings = ProducerSettings(
        backend="openai",
        openai_base_url="http://127.0.0.1:9/v1/",
        openai_model="served-name",
        openai_max_retries=2,
    )
    gen = make_generator(settings, "ignored-local-name", "cpu")
    try:
        assert isinstance(gen, OpenAICompatGenerator)
        assert isinstance(gen, Generator)
        assert gen.model == "served-name"
        assert gen.base_url == "http://127.0.0.1:9/v1"
        assert gen.max_retries == 2
        assert gen.id == "openai:served-name"
    finally:
        gen.close()


def test_make_generator_transformers_reports_a_missing_model_dir(tmp_path: Path) -> None:
    settings = ProducerSettings(backend="transformers")
    with pytest.raises(GeneratorError, match="does not exist"):
        make_generator(settings, str(tmp_path / "nope"), "cpu")


# ---------------------------------------------------------------------------------
# OpenAI-compatible backend


Script = list[tuple[int, dict[str, str], Any]]  # (status, headers, body) per request


class FakeRateLimitedServer:
    """A scripted stand-in for a rate-limiting OpenAI-compatible ``/completions`` server.

    A fake is needed because a real server (vLLM, llama.cpp) cannot be made to
    return 429 or 503 on demand, nor to send a chosen ``Retry-After``; this one
    answers from a script, ``(status, headers, body)`` per request, and records each
    request's path, headers and JSON body. After the script runs out it answers
    with a valid completion for every prompt (text ``"<prompt>|out"``), choices in
    reverse order to check that the client orders them by ``index``.
    """

    def __init__(self, script: Script | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                body = json.loads(raw) if raw else None
                with owner._lock:
                    owner.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    step = owner.script.pop(0) if owner.script else None
                headers: dict[str, str]
                if step is None:
                    status, headers, payload = 200, {}, owner.completion(body)
                else:
                    status, headers, payload = step
                data = (
                    payload.encode("utf-8")
                    if isinstance(payload, str)
                    else json.dumps(payload).encode("utf-8")
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @staticmethod
    def completion(body: Any) -> dict[str, Any]:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = [
            {"index": i, "text": f"{p}|out", "finish_reason": "stop", "logprobs": None}
            for i, p in enumerate(prompts)
        ]
        return {"id": "cmpl-1", "object": "text_completion", "choices": choices[::-1]}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeRateLimitedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


PARAMS = GenerationSettings(temperature=0.7, top_p=0.9, max_new_tokens=16, seed=5)


def _client(server: FakeRateLimitedServer, **kwargs: Any) -> OpenAICompatGenerator:
    opts: dict[str, Any] = {"api_key": "sk-test", "max_retries": 6, "timeout_s": 5.0}
    opts.update(kwargs)
    return OpenAICompatGenerator(server.base_url, "tiny", **opts)


def test_openai_retries_429_and_503_then_returns_texts_in_prompt_order() -> None:
    script: Script = [
        (429, {"Retry-After": "3"}, {"error": "slow down"}),
        (429, {}, {"error": "slow down"}),
        (503, {}, {"error": "overloaded"}),
    ]
    sleep = RecordingSleep()
    with FakeRateLimitedServer(script) as server:
        gen = _client(server, sleep=sleep, base_delay_s=0.1, jitter=lambda cap: cap)
        try:
            out = gen.generate(["uno", "due", "tre"], PARAMS, ["[|"])
        finally:
            gen.close()
    assert out == ["uno|out", "due|out", "tre|out"]
    assert len(server.requests) == 4
    # Retry-After is honoured; then exponential back-off: base * 2**retry.
    assert sleep.delays == pytest.approx([3.0, 0.2, 0.4])
    req = server.requests[-1]
    assert req["path"] == "/v1/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "tiny"
    assert body["prompt"] == ["uno", "due", "tre"]
    assert body["max_tokens"] == 16
    assert body["temperature"] == 0.7
    assert body["top_p"] == 0.9
    assert body["stop"] == ["[|"]
    assert isinstance(body["seed"], int)
    # A retry re-sends the same request (same seed).
    assert {json.dumps(r["body"], sort_keys=True) for r in server.requests} == {
        json.dumps(body, sort_keys=True)
    }


def test_openai_backoff_uses_full_jitter_within_exponential_bounds() -> None:
    script: Script = [(503, {}, "busy")] * 5
    sleep = RecordingSleep()
    rng = random.Random(42)
    with FakeRateLimitedServer(script) as server:
        gen = _client(
            server,
            sleep=sleep,
            base_delay_s=0.5,
            max_delay_s=4.0,
            jitter=lambda cap: rng.uniform(0.0, cap),
        )
        try:
            assert gen.generate(["x"], PARAMS, []) == ["x|out"]
        finally:
            gen.close()
    assert len(server.requests) == 6
    caps = [min(4.0, 0.5 * 2**k) for k in range(5)]
    assert caps == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert len(sleep.delays) == 5
    for delay, cap in zip(sleep.delays, caps, strict=True):
        assert 0.0 <= delay <= cap
    # With jitter the sequence is not monotonic, but it is not constant either.
    assert len(set(sleep.delays)) == 5


def test_openai_default_jitter_stays_within_bounds() -> None:
    sleep = RecordingSleep()
    with FakeRateLimitedServer([(502, {}, "bad gateway")] * 3) as server:
        gen = _client(server, sleep=sleep, base_delay_s=0.01)
        try:
            gen.generate(["x"], PARAMS, [])
        finally:
            gen.close()
    assert [d <= 0.01 * 2**k for k, d in enumerate(sleep.delays)] == [True] * 3


def test_openai_gives_up_after_the_cap_with_the_last_status_and_body() -> None:
    sleep = RecordingSleep()
    with FakeRateLimitedServer([(503, {}, "still overloaded")] * 10) as server:
        gen = _client(server, sleep=sleep, max_retries=2, base_delay_s=0.01)
        try:
            with pytest.raises(
                GeneratorUnavailableError, match=r"3 attempt.*HTTP 503.*still overloaded"
            ):
                gen.generate(["x"], PARAMS, [])
        finally:
            gen.close()
    assert len(server.requests) == 3
    assert len(sleep.delays) == 2


def test_openai_fails_at_once_on_400() -> None:
    sleep = RecordingSleep()
    script: Script = [(400, {}, {"error": {"message": "max_tokens is too large"}})]
    with FakeRateLimitedServer(script) as server:
        gen = _client(server, sleep=sleep)
        try:
            with pytest.raises(GeneratorError, match=r"HTTP 400.*max_tokens is too large"):
                gen.generate(["x"], PARAMS, [])
        finally:
            gen.close()
    assert len(server.requests) == 1
    assert sleep.delays == []


def test_openai_retries_connection_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on that port now: every attempt is refused.
    sleep = RecordingSleep()
    gen = OpenAICompatGenerator(
        f"http://127.0.0.1:{port}/v1", "tiny", max_retries=3, sleep=sleep, base_delay_s=0.01
    )
    try:
        with pytest.raises(GeneratorUnavailableError, match="connection error"):
            gen.generate(["x"], PARAMS, [])
    finally:
        gen.close()
    assert len(sleep.delays) == 3


def test_openai_without_key_sends_no_auth_and_can_send_one_prompt_per_request() -> None:
    with FakeRateLimitedServer() as server:
        gen = OpenAICompatGenerator(server.base_url, "tiny", batch_prompts=False)
        try:
            out = gen.generate(["a", "b"], PARAMS, ["|"])
        finally:
            gen.close()
    assert out == ["a", "b"]  # cut at the stop string
    assert [r["body"]["prompt"] for r in server.requests] == ["a", "b"]
    assert all("Authorization" not in r["headers"] for r in server.requests)


def test_openai_identical_prompts_go_in_separate_requests_with_distinct_seeds() -> None:
    with FakeRateLimitedServer() as server:
        gen = _client(server)
        try:
            out = gen.generate(["p", "q", "p", "p"], PARAMS, [])
        finally:
            gen.close()
    assert out == ["p|out", "q|out", "p|out", "p|out"]
    prompts = [r["body"]["prompt"] for r in server.requests]
    assert prompts == [["p", "q"], ["p"], ["p"]]
    assert len({r["body"]["seed"] for r in server.requests}) == 3


def test_openai_rejects_a_response_missing_a_choice() -> None:
    script: Script = [(200, {}, {"choices": [{"index": 0, "text": "only one"}]})]
    with FakeRateLimitedServer(script) as server:
        gen = _client(server)
        try:
            with pytest.raises(GeneratorError, match=r"no choice for prompt\(s\) \[1\]"):
                gen.generate(["a", "b"], PARAMS, [])
        finally:
            gen.close()


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("-1") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


# ---------------------------------------------------------------------------------
# transformers backend (a tiny random Llama built here)

SENTENCES = [
    "Ciao, come stai oggi?",
    "Sto bene, grazie. E tu?",
    "[|Umano|] Qual è la capitale d'Italia?",
    "[|Assistente|] La capitale d'Italia è Roma.",
    "Mi piace la pizza con la mozzarella e il basilico.",
    "Domani andiamo al mare insieme, se non piove.",
    "Il treno per Milano parte alle otto e mezza.",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_generator(tiny_model_dir: Path) -> Iterator[Any]:
    gen = make_generator(ProducerSettings(backend="transformers"), str(tiny_model_dir), "cpu")
    yield gen
    gen.close()


PROMPTS = ["Ciao", "[|Umano|] Qual è la capitale d'Italia?\n[|Assistente|]", "Mi piace la"]
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=12, seed=0)
SAMPLED = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=11)


def test_hf_batch_of_different_lengths_returns_one_string_each(
    tiny_model_dir: Path, hf_generator: Any
) -> None:
    from producers.generators.hf import HFGenerator

    assert isinstance(hf_generator, HFGenerator)
    assert hf_generator.id == f"transformers:{tiny_model_dir.name}"
    out = hf_generator.generate(PROMPTS, GREEDY, [])
    assert len(out) == 3
    assert all(isinstance(t, str) for t in out)
    assert hf_generator.generate([], GREEDY, []) == []


def test_hf_greedy_is_deterministic(hf_generator: Any) -> None:
    first = hf_generator.generate(PROMPTS, GREEDY, [])
    second = hf_generator.generate(PROMPTS, GREEDY.model_copy(update={"seed": 99}), [])
    assert first == second


def test_hf_same_seed_same_samples(tiny_model_dir: Path, hf_generator: Any) -> None:
    from producers.generators.hf import HFGenerator

    other = HFGenerator(str(tiny_model_dir), device="cpu")
    try:
        # A fresh generator replays the same sequence of calls exactly.
        a1, a2 = (other.generate(PROMPTS, SAMPLED, []) for _ in range(2))
    finally:
        other.close()
    again = HFGenerator(str(tiny_model_dir), device="cpu")
    try:
        b1, b2 = (again.generate(PROMPTS, SAMPLED, []) for _ in range(2))
    finally:
        again.close()
    assert (a1, a2) == (b1, b2)
    assert a1 != a2  # the call counter changes the seed: a regeneration differs


def test_hf_sampling_leaves_the_global_rng_alone(hf_generator: Any) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    hf_generator.generate(PROMPTS[:1], SAMPLED, [])
    assert torch.equal(torch.rand(3), expected)


def test_hf_stop_strings_cut_the_output(hf_generator: Any) -> None:
    full = hf_generator.generate(PROMPTS, GREEDY, [])
    text = max(full, key=len)
    assert len(text) >= 4, full
    i = full.index(text)
    stop = text[2:4]
    cut = hf_generator.generate(PROMPTS, GREEDY, [stop, "[|"])[i]
    assert cut == cut_at_stop(text, [stop, "[|"])
    assert stop not in cut
    assert len(cut) < len(text)
