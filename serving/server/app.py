"""The OpenAI-compatible server: app assembly, lifespan, error bodies, ``run_server``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(both with ``stream``), ``GET /health`` (open), ``GET /metrics`` (Prometheus) and
the web chat page at ``GET /``. Everything but ``/health`` needs the API key when
one is set (``security.py``).

    registry = ModelRegistry(load_backend("full", "path/to/model", settings.serving))
    run_server(settings.serving, registry)          # 127.0.0.1:8000 by default

or from the shell: ``python -m serving.server --model path/to/model``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from corpusfactory.chatformat import ChatFormat
from corpusfactory.settings import ServingSettings
from serving.backends.base import BackendError, ContextLengthError
from serving.server.metrics import MetricsMiddleware, ServerMetrics
from serving.server.prompts import ChatRequestError
from serving.server.registry import ModelRegistry, NoModelError
from serving.server.routes import router
from serving.server.security import APIKeyMiddleware, check_bind
from serving.server.serving import OpenAIServing

log = logging.getLogger(__name__)

# Threads that may wait on a model at once (reading pieces, tokenizing). Generous:
# a thread waiting for its turn on a one-at-a-time backend only sleeps.
MODEL_THREADS = 128


def _error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, problems, "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(ChatRequestError)
    async def bad_chat(request: Request, exc: ChatRequestError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(ContextLengthError)
    async def too_long(request: Request, exc: ContextLengthError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error", "context_length_exceeded")

    @app.exception_handler(NoModelError)
    async def no_model(request: Request, exc: NoModelError) -> JSONResponse:
        return _error(503, str(exc), "server_error", "model_not_loaded")

    @app.exception_handler(BackendError)
    async def backend_failed(request: Request, exc: BackendError) -> JSONResponse:
        log.error("backend failed: %s", exc)
        return _error(500, str(exc), "server_error")


def create_app(
    registry: ModelRegistry, settings: ServingSettings, *, chat_format: ChatFormat | None = None
) -> FastAPI:
    """The app. It owns ``registry`` once started: shutdown closes the served model."""
    metrics = ServerMetrics(registry)
    fmt = chat_format or ChatFormat()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The limiter belongs to the running loop, so it is made here, not at import.
        limiter = anyio.CapacityLimiter(MODEL_THREADS)
        app.state.serving = OpenAIServing(registry, settings, metrics, fmt, limiter)
        log.info("serving %s", registry.current_id or "nothing yet (waiting for a model)")
        try:
            yield
        finally:
            # In-flight requests keep their leases; the model closes after the last.
            registry.close()

    app = FastAPI(
        title="corpusfactory", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.models = registry
    app.state.metrics = metrics
    app.include_router(router)
    _install_error_handlers(app)
    routes = {getattr(r, "path", "") for r in router.routes} - {""}
    # Added last = outermost: the metrics see the key refusals too.
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    return app


def run_server(
    settings: ServingSettings,
    registry: ModelRegistry,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    *,
    chat_format: ChatFormat | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted. Refuses a non-loopback host without an API key."""
    host = settings.host if host is None else host  # "" is not "the default": it is refused
    port = settings.port if port is None else port
    key = api_key or settings.api_key
    check_bind(host, key)
    settings = settings.model_copy(update={"host": host, "port": port, "api_key": key})
    app = create_app(registry, settings, chat_format=chat_format)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), proxy_headers=False)
