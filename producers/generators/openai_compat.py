"""The OpenAI-compatible backend: ``POST {base_url}/completions`` on any such server.

Works with vLLM's and llama.cpp's servers (and OpenAI-style gateways). Requests
are retried on 429, 5xx, connection errors and timeouts with exponential
back-off and full jitter (a uniform delay in ``[0, base * 2**retry]``, capped),
honouring ``Retry-After`` when the server sends one. Any other 4xx fails at
once: retrying a bad request cannot help.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from corpusfactory.errors import GeneratorError, GeneratorUnavailableError
from corpusfactory.settings import GenerationSettings
from corpusfactory.text import cut_at_stop
from producers.generators.base import derive_seed

_BODY_CHARS = 500  # how much of an error body goes into an error message


def full_jitter(cap: float) -> float:
    """A uniform delay in ``[0, cap]`` (the "full jitter" strategy)."""
    return random.uniform(0.0, cap)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OpenAICompatGenerator:
    """A generator backed by an OpenAI-compatible ``/completions`` endpoint.

    ``batch_prompts=True`` sends a batch as one request with a list ``prompt`` (vLLM
    supports it); ``False`` sends one request per prompt (for servers that do not).
    ``sleep``, ``base_delay_s``, ``max_delay_s`` and ``jitter`` are injectable so tests
    run fast and deterministic; ``transport`` lets tests plug an ``httpx`` transport.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_retries: int = 6,
        timeout_s: float = 60.0,
        batch_prompts: bool = True,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[float], float] = full_jitter,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.batch_prompts = batch_prompts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_retry_after_s = max_retry_after_s
        self._sleep = sleep
        self._jitter = jitter
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s), headers=headers, transport=transport
        )
        self._calls = 0
        self._calls_lock = threading.Lock()
        self.id = f"openai:{model}"

    # -- public -------------------------------------------------------------------

    def generate(
        self, prompts: list[str], params: GenerationSettings, stop: list[str]
    ) -> list[str]:
        if self._client.is_closed:
            raise GeneratorError("openai generator: generate() after close()")
        if not prompts:
            return []
        with self._calls_lock:
            call = self._calls
            self._calls += 1
        stops = [s for s in stop if s]
        out: list[str | None] = [None] * len(prompts)
        for round_no, positions in enumerate(self._rounds(prompts)):
            seed = derive_seed(params.seed, call, round_no)
            texts = self._complete([prompts[i] for i in positions], params, stops, seed)
            for i, text in zip(positions, texts, strict=True):
                out[i] = cut_at_stop(text, stops)
        return [t if t is not None else "" for t in out]

    def close(self) -> None:
        self._client.close()

    # -- internals ----------------------------------------------------------------

    def _rounds(self, prompts: list[str]) -> list[list[int]]:
        """Positions grouped into requests.

        One request per prompt, or (batched) as few requests as possible such that no
        request holds the same prompt twice: a request has one seed, and identical
        prompts under one seed would come back identical.
        """
        if not self.batch_prompts:
            return [[i] for i in range(len(prompts))]
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, p in enumerate(prompts):
            r = seen.get(p, -1) + 1
            seen[p] = r
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        return rounds

    def _complete(
        self, prompts: list[str], params: GenerationSettings, stop: list[str], seed: int
    ) -> list[str]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompts if self.batch_prompts else prompts[0],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
            "n": 1,
        }
        if stop:
            body["stop"] = stop
        data = self._post_with_retries("/completions", body)
        return self._texts(data, len(prompts))

    def _delay(self, retry: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = parse_retry_after(response.headers.get("Retry-After"))
            if after is not None:
                return min(after, self.max_retry_after_s)
        cap = min(self.max_delay_s, self.base_delay_s * (2.0**retry))
        return max(0.0, self._jitter(cap))

    def _post_with_retries(self, path: str, body: dict[str, Any]) -> Any:
        url = self.base_url + path
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            response: httpx.Response | None = None
            try:
                response = self._client.post(url, json=body)
            except httpx.TimeoutException as exc:
                last = f"timeout ({type(exc).__name__}: {exc})"
            except httpx.TransportError as exc:
                last = f"connection error ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise GeneratorError(
                            f"openai generator: {url} answered {status} with a body that is "
                            f"not JSON: {response.text[:_BODY_CHARS]!r}"
                        ) from None
                if status != 429 and status < 500:
                    raise GeneratorError(
                        f"openai generator: {url} refused the request with HTTP {status} "
                        f"(not retried): {response.text[:_BODY_CHARS]}"
                    )
                last = f"HTTP {status}: {response.text[:_BODY_CHARS]}"
            if attempt == self.max_retries:
                break
            self._sleep(self._delay(attempt, response))
        raise GeneratorUnavailableError(
            f"openai generator: {url} failed after {self.max_retries + 1} attempt(s); "
            f"last error: {last}"
        )

    def _texts(self, data: Any, n: int) -> list[str]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            raise GeneratorError(f"openai generator: response has no 'choices' list: {data!r:.300}")
        texts: list[str | None] = [None] * n
        for pos, choice in enumerate(choices):
            if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
                raise GeneratorError(f"openai generator: malformed choice: {choice!r:.300}")
            index = choice.get("index", pos)
            if not isinstance(index, int) or not 0 <= index < n or texts[index] is not None:
                raise GeneratorError(
                    f"openai generator: bad or repeated choice index {index!r} for {n} prompt(s)"
                )
            texts[index] = choice["text"]
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            raise GeneratorError(f"openai generator: no choice for prompt(s) {missing}")
        return [t or "" for t in texts]
