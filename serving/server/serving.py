"""The serving logic behind the routes: requests in, completions or SSE events out.

Each request takes a lease on the registry's current backend, generates, and
gives the lease back when its response is complete (after the last SSE event,
or when the client goes away). Every blocking call on a model - tokenizing,
starting, reading the next piece - runs in a worker thread, never on the loop.
Streamed and whole answers come from the same code path, so with greedy
decoding the concatenated chunks equal the non-streamed text.

The ``model`` field of a request is informational: the server answers with the
model it currently serves and says which in every response. Requests are not
refused over a name, because the served model changes with every swap.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from corpusfactory.chatformat import ChatFormat
from corpusfactory.settings import ServingSettings
from serving.backends.base import Backend, BackendError, GenerationParams, TextStream
from serving.server import protocol as p
from serving.server.metrics import ServerMetrics
from serving.server.prompts import ReplyTidier, build_chat_prompt, chat_stops
from serving.server.registry import Lease, ModelRegistry

DONE = "data: [DONE]\n\n"


def sse(obj: p.BaseModel | dict[str, object]) -> str:
    data = obj.model_dump_json() if isinstance(obj, p.BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _next_or_none(stream: TextStream) -> str | None:
    return next(stream, None)


@dataclass(eq=False)
class _Job:
    lease: Lease
    stream: TextStream
    tidier: ReplyTidier | None
    created: int = field(default_factory=lambda: int(time.time()))
    finished: bool = False

    @property
    def model(self) -> str:
        return self.lease.backend.id

    def usage(self) -> p.UsageInfo:
        s = self.stream
        total = s.prompt_tokens + s.completion_tokens
        return p.UsageInfo(
            prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, total_tokens=total
        )


class EventStream:
    """The SSE events of one streamed response; ``aclose`` frees the model (idempotent)."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        self._events = events
        self._cleanup = cleanup

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for event in self._events:
                yield event
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):  # runs even when the client went away
            await self._cleanup()


class OpenAIServing:
    def __init__(
        self,
        models: ModelRegistry,
        settings: ServingSettings,
        metrics: ServerMetrics,
        fmt: ChatFormat,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.fmt = fmt
        self.limiter = limiter

    def list_models(self) -> p.ModelList:
        if self.models.current_id is None:
            return p.ModelList(data=[])
        card = p.ModelCard(id=self.models.current_id, created=self.models.current_created or 0)
        return p.ModelList(data=[card])

    def _params(
        self, req: p.SamplingRequest, limit: int | None, stop: tuple[str, ...]
    ) -> GenerationParams:
        temperature = self.settings.temperature if req.temperature is None else req.temperature
        return GenerationParams(
            max_tokens=limit or self.settings.max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=stop,
            seed=req.seed,
        )

    async def _start(
        self, build: Callable[[Backend], tuple[str, GenerationParams]], chat: bool
    ) -> _Job:
        lease = self.models.lease()
        try:
            backend = lease.backend
            stream = await anyio.to_thread.run_sync(
                lambda: backend.generate_stream(*build(backend)), limiter=self.limiter
            )
        except BaseException:
            lease.release()
            raise
        return _Job(lease, stream, ReplyTidier() if chat else None)

    async def _texts(self, job: _Job) -> AsyncIterator[str]:
        while True:
            piece = await anyio.to_thread.run_sync(_next_or_none, job.stream, limiter=self.limiter)
            if piece is None:
                return
            if job.tidier is not None:
                piece = job.tidier.feed(piece)
            if piece:
                yield piece

    async def _finish(self, job: _Job) -> None:
        if job.finished:
            return
        job.finished = True
        try:
            # close() may wait for a piece in flight: not on the loop.
            await anyio.to_thread.run_sync(job.stream.close, limiter=self.limiter)
        finally:
            job.lease.release()
            self.metrics.prompt_tokens.inc(job.stream.prompt_tokens)
            self.metrics.generated_tokens.inc(job.stream.completion_tokens)

    # -- chat completions ------------------------------------------------------------

    async def chat(self, req: p.ChatCompletionRequest) -> p.ChatCompletionResponse | EventStream:
        def build(backend: Backend) -> tuple[str, GenerationParams]:
            params = self._params(req, req.token_limit, chat_stops(self.fmt, req.stop_list()))
            # Leave room for the reply, but never more than half the window.
            budget = backend.n_ctx - min(params.max_tokens, backend.n_ctx // 2)
            pairs = [(m.role, m.text) for m in req.messages]
            prompt = build_chat_prompt(pairs, self.fmt, backend.count_tokens, budget)
            return prompt.text, params

        job = await self._start(build, chat=True)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return EventStream(
                self._chat_events(job, rid, req.include_usage), lambda: self._finish(job)
            )
        try:
            text = "".join([piece async for piece in self._texts(job)])
        finally:
            await self._finish(job)
        choice = p.ChatChoice(
            message=p.AssistantMessage(content=text), finish_reason=job.stream.finish_reason
        )
        return p.ChatCompletionResponse(
            id=rid, created=job.created, model=job.model, choices=[choice], usage=job.usage()
        )

    async def _chat_events(self, job: _Job, rid: str, include_usage: bool) -> AsyncIterator[str]:
        def chunk(
            delta: p.DeltaMessage, finish: p.FinishReason | None = None
        ) -> p.ChatCompletionChunk:
            choice = p.ChatChunkChoice(delta=delta, finish_reason=finish)
            return p.ChatCompletionChunk(
                id=rid, created=job.created, model=job.model, choices=[choice]
            )

        yield sse(chunk(p.DeltaMessage(role="assistant", content="")))
        try:
            async for piece in self._texts(job):
                yield sse(chunk(p.DeltaMessage(content=piece)))
        except BackendError as exc:
            yield sse({"error": {"message": str(exc), "type": "server_error", "code": None}})
            yield DONE
            return
        yield sse(chunk(p.DeltaMessage(), job.stream.finish_reason))
        if include_usage:
            yield sse(
                p.ChatCompletionChunk(
                    id=rid, created=job.created, model=job.model, choices=[], usage=job.usage()
                )
            )
        yield DONE

    # -- completions -----------------------------------------------------------------

    async def complete(self, req: p.CompletionRequest) -> p.CompletionResponse | EventStream:
        def build(backend: Backend) -> tuple[str, GenerationParams]:
            return req.prompt_text, self._params(req, req.max_tokens, tuple(req.stop_list()))

        job = await self._start(build, chat=False)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return EventStream(
                self._completion_events(job, rid, req.include_usage), lambda: self._finish(job)
            )
        try:
            text = "".join([piece async for piece in self._texts(job)])
        finally:
            await self._finish(job)
        choice = p.CompletionChoice(text=text, finish_reason=job.stream.finish_reason)
        return p.CompletionResponse(
            id=rid, created=job.created, model=job.model, choices=[choice], usage=job.usage()
        )

    async def _completion_events(
        self, job: _Job, rid: str, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(text: str, finish: p.FinishReason | None = None) -> p.CompletionResponse:
            choice = p.CompletionChoice(text=text, finish_reason=finish)
            return p.CompletionResponse(
                id=rid, created=job.created, model=job.model, choices=[choice]
            )

        try:
            async for piece in self._texts(job):
                yield sse(chunk(piece))
        except BackendError as exc:
            yield sse({"error": {"message": str(exc), "type": "server_error", "code": None}})
            yield DONE
            return
        yield sse(chunk("", job.stream.finish_reason))
        if include_usage:
            yield sse(
                p.CompletionResponse(
                    id=rid, created=job.created, model=job.model, choices=[], usage=job.usage()
                )
            )
        yield DONE
