"""OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

    nanoseek serve runs/ckpt [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.completions.create(model="nanoseek", prompt="def fib(n):", max_tokens=64)
    client.completions.create(model="nanoseek", prompt="def f(x):\\n    ", suffix="\\n", max_tokens=32)  # FIM
    client.chat.completions.create(model="nanoseek", messages=[...], stream=True,
                                   extra_body={"thinking": True})  # -> delta.reasoning_content

The server in modules (the shape of vLLM's entrypoints):
    protocol.py   configuration, request models, OpenAI-shaped errors, usage
    routes.py     the APIRouter (health, models, completions, chat completions); state on app.state
    streaming.py  waiting on the engine: whole results, server-sent events, disconnects, shutdown
    app.py        create_app (middleware, error handlers, the router, the chat page) and serve()
    cli.py        `nanoseek serve`

Streaming uses server-sent events in OpenAI's chunk format and ends with `data: [DONE]`.
Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status; the API
key is checked before the body is read; bodies over the limit get 413 (chunked ones too); a 429
carries Retry-After. A failure inside one request (e.g. sampling parameters that cannot be
computed) ends that request alone, with an error, and never its batch neighbours (batch.py).
On SIGTERM the server stops accepting, gives running requests `shutdown_timeout` seconds, then
ends the rest with an OpenAI-shaped 503 (streams: an error event and `data: [DONE]`).
With `--speculative K` /health reports the acceptance rate, and each response's usage carries the
request's drafts in `completion_tokens_details.{accepted,rejected}_prediction_tokens`.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat_format import ChatStreamSplitter
from ..engine import Engine
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, SafeJSONResponse, ServeConfig, error_body,
                       error_response, validation_error)
from .routes import ServerState, router

__all__ = ["create_app", "serve", "ServeConfig", "APIError", "ChatStreamSplitter", "CompletionRequest",
           "ChatCompletionRequest", "error_body", "STATIC_DIR"]

log = logging.getLogger("nanoseek.serve")
STATIC_DIR = Path(__file__).parent / "static"  # the chat page, served at / when it exists


# -------------------------------------------------------------------------------------------
# Middleware (pure ASGI: they answer before FastAPI reads or parses anything)
# -------------------------------------------------------------------------------------------


async def _send_error(scope, receive, send, status: int, message: str, type: str, code: str, headers=()) -> None:
    resp = SafeJSONResponse(error_body(message, type, code=code), status_code=status, headers=dict(headers))
    await resp(scope, receive, send)


class AuthMiddleware:
    """`Authorization: Bearer KEY` on /v1/*, checked before the body is read."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    def _ok(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode("latin-1"),
                                                                              self.key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/") or self._ok(scope):
            return await self.app(scope, receive, send)
        await _send_error(scope, receive, send, 401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                          "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """Read the whole body first: over `limit` bytes (by Content-Length or while reading a chunked
    body) the answer is 413; otherwise the app gets the body replayed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _too_large(self, scope, receive, send) -> None:
        await _send_error(scope, receive, send, 413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                          "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left while sending
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._too_large(scope, receive, send)
            more = msg.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


# -------------------------------------------------------------------------------------------
# The app
# -------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        typ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=typ))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


def _mount_static(app: FastAPI, static_dir: Path) -> None:
    """The chat page (nanoseek/serve/static/index.html) at /, when it exists. Routes match first."""
    if (static_dir / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=static_dir, html=True), name="static")


def create_app(engine: Engine, tokenizer, config: ServeConfig | None = None, static_dir: Path | None = None) -> FastAPI:
    """The FastAPI app over a started Engine. State for the routes: `app.state.server`
    (ServerState: engine, tokenizer, config, counters, shutdown), plus `app.state.engine` and
    `app.state.config`. No /docs page (it would load its script from a CDN); /openapi.json is there."""
    cfg = config or ServeConfig()
    app = FastAPI(title="nanoseek", version="0.1.0", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a nanoseek (DeepSeek-V4 architecture) model.")
    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_key=cfg.api_key)  # (added last = runs first)
    _install_error_handlers(app)
    app.state.server = ServerState(engine, tokenizer, cfg)
    app.state.engine, app.state.config = engine, cfg
    app.include_router(router)
    _mount_static(app, STATIC_DIR if static_dir is None else Path(static_dir))
    return app


# -------------------------------------------------------------------------------------------
# Running it
# -------------------------------------------------------------------------------------------


def max_len_warning(max_len: int, model) -> str | None:
    """A warning when the per-slot length exceeds the positions the checkpoint was built for
    (positions past max_position_embeddings are extrapolation: the model was never trained there)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_len > limit:
        return (f"nanoseek: warning: --max-model-len {max_len} exceeds the checkpoint's max_position_embeddings="
                f"{limit}; positions past {limit} are untrained extrapolation (pass --max-model-len {limit})")
    return None


def _uvicorn_server(app: FastAPI, host: str, port: int, log_level: str):
    """A uvicorn Server whose SIGTERM/SIGINT first starts the drain: no new requests, running
    ones get `shutdown_timeout` seconds, then are ended with an error (streams: event + [DONE])."""
    import uvicorn

    st: ServerState = app.state.server
    grace = st.cfg.shutdown_timeout

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not st.drain.draining:
                print(f"nanoseek: shutting down; running requests get {grace:g} s to finish", flush=True)
            st.drain.begin(grace)
            super().handle_exit(sig, frame)

    # uvicorn waits for open connections up to timeout_graceful_shutdown, then cancels them:
    # leave time after the grace period for the error answers to be written.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + 3)
    return Server(config)


def warm_up(engine, model) -> None:
    """Compile the decode step before the port opens, so that no request waits for it (about a
    minute the first time a model shape is served on a machine, seconds with inductor's cache)."""
    if not getattr(model, "blocks_compiled", False):
        return
    print("nanoseek: compiling the decode step (once per model shape and machine, then cached) ...", flush=True)
    t = time.perf_counter()
    engine.warm_up()
    print(f"nanoseek: decode step ready in {time.perf_counter() - t:.1f} s", flush=True)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
          tokenizer_dir: str | None = None, model_name: str | None = None, max_batch: int = 8,
          max_len: int = 4096, dtype: str | None = None, threads: int | None = None,
          config: ServeConfig | None = None, log_level: str = "info", speculative_tokens: int = 0,
          compile: bool | None = None) -> None:
    """Load a checkpoint + tokenizer, start the engine thread and run uvicorn until SIGTERM/SIGINT.
    compile: the decode step (None = auto, engine/compiling.py)."""
    from ..engine.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, tokenizer_dir, dtype=dtype, threads=threads, compile=compile)
    warning = max_len_warning(max_len, model)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    cfg = config or ServeConfig()
    cfg.model_name = model_name or cfg.model_name
    cfg.api_key = api_key if api_key is not None else cfg.api_key
    engine = Engine(model, tokenizer=tok, max_batch=max_batch, max_len=max_len,
                    speculative_tokens=speculative_tokens)
    warm_up(engine, model)
    engine.start()
    app = create_app(engine, tok, cfg)
    print(f"nanoseek: serving '{cfg.model_name}' on http://{host}:{port}/v1 "
          f"({max_batch} slots x {max_len} tokens, cache {engine.cache_bytes() / 2**20:.1f} MiB"
          f"{f', MTP speculative decoding with {speculative_tokens} drafts' if speculative_tokens else ''}"
          f"{', API key required' if cfg.api_key else ''})", flush=True)
    try:
        _uvicorn_server(app, host, port, log_level).run()
    finally:
        engine.stop()
