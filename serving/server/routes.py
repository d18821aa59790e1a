"""The HTTP routes: thin wrappers that hand requests to ``OpenAIServing``.

Errors are answered OpenAI-style, ``{"error": {"message", "type", "param", "code"}}``
(see ``app.py`` for the handlers).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from serving.server import protocol as p
from serving.server.metrics import ServerMetrics
from serving.server.serving import EventStream, OpenAIServing

STATIC = Path(__file__).parent / "static"

router = APIRouter()


class SSEResponse(StreamingResponse):
    """Server-sent events whose model lease is freed however the response ends.

    The event generator frees it when it finishes; this covers a response that
    is cancelled before the generator ever started (client gone at once).
    """

    def __init__(self, events: EventStream) -> None:
        super().__init__(
            events.__aiter__(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


def _respond(result: p.BaseModel | EventStream) -> Response:
    if isinstance(result, EventStream):
        return SSEResponse(result)
    return JSONResponse(result.model_dump())


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """Open without a key: says whether a model is loaded, nothing more."""
    loaded = request.app.state.models.current_id is not None
    return {"status": "ok" if loaded else "loading"}


@router.get("/v1/models", response_model=p.ModelList)
async def list_models(request: Request) -> p.ModelList:
    return _serving(request).list_models()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Response:
    return _respond(await _serving(request).chat(req))


@router.post("/v1/completions", response_model=None)
async def completions(req: p.CompletionRequest, request: Request) -> Response:
    return _respond(await _serving(request).complete(req))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    server_metrics: ServerMetrics = request.app.state.metrics
    return Response(server_metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "chat.html", media_type="text/html")
