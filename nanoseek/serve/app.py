"""OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

    nanoseek serve --model runs/ckpt [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.completions.create(model="nanoseek", prompt="def fib(n):", max_tokens=64)
    client.completions.create(model="nanoseek", prompt="def f(x):\\n    ", suffix="\\n", max_tokens=32)  # FIM
    client.chat.completions.create(model="nanoseek", messages=[...], stream=True,
                                   extra_body={"thinking": True})  # -> delta.reasoning_content

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions (prompt, suffix ->
fill-in-the-middle, max_tokens, temperature, top_p, top_k, n, stop, stream, logprobs, seed),
POST /v1/chat/completions (messages, tools -> DSML, `thinking` switch -> reasoning_content,
reasoning_effort, stream, logprobs/top_logprobs, seed, stop, n); OpenAPI schema at /openapi.json.

Streaming uses server-sent events in OpenAI's chunk format and ends with `data: [DONE]`.
With `--speculative K` (MTP speculative decoding in the engine) /health reports the acceptance
rate and tokens per verification call, and each response's usage carries the request's drafts in
`completion_tokens_details.{accepted,rejected}_prediction_tokens`.
Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
The HTTP layer never runs the model: requests are queued to the engine thread (scheduler.py)
and their tokens come back through asyncio queues; a client that disconnects cancels its
request, which frees its decode slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import chat_format
from ..engine.generate import fim_prompt
from ..engine.sampling import SamplingParams
from ..engine.scheduler import Engine, EngineError

# -------------------------------------------------------------------------------------------
# Configuration and errors
# -------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    model_name: str = "nanoseek"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    max_prompt_tokens: int | None = None  # default: what the engine's cache holds
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (chat; completions default to 16 as OpenAI)
    max_concurrent: int = 64  # requests in flight (streaming or not); more get 429
    max_n: int = 8


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Reject request bodies over `limit` bytes (by Content-Length, and while reading)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = JSONResponse(error_body(f"request body exceeds {self.limit} bytes", "invalid_request_error",
                                                   code="request_too_large"), status_code=413)
                    return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return msg

        await self.app(scope, limited, send)


# -------------------------------------------------------------------------------------------
# Request schemas (OpenAI's, plus top_k and the thinking switch)
# -------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: Optional[str] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: Optional[int] = None


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    thinking: Optional[Union[bool, dict[str, Any]]] = None
    reasoning_effort: Optional[Literal["high", "max"]] = None


# -------------------------------------------------------------------------------------------
# The app
# -------------------------------------------------------------------------------------------


def create_app(engine: Engine, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    cfg = config or ServeConfig()
    max_prompt = min(cfg.max_prompt_tokens or engine.max_len - 1, engine.max_len - 1)
    app = FastAPI(title="nanoseek", version="0.1.0",
                  description="OpenAI-compatible API over a nanoseek (DeepSeek-V4 architecture) model.")
    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes)
    state = {"in_flight": 0, "started": int(time.time())}
    eos = tokenizer.eos_id

    # ---- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request, e):
        return _error_response(APIError(413, f"request body exceeds {cfg.max_body_bytes} bytes",
                                        code="request_too_large"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = "could not parse the request body as JSON"
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                            for er in errs[:5])
        return _error_response(APIError(400, msg, param=".".join(loc) or None, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        typ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=typ))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    # ---- dependencies ----------------------------------------------------------------------
    async def auth(request: Request):
        if cfg.api_key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    def check_common(req: _Common) -> None:
        if req.model != cfg.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{cfg.model_name}'",
                           param="model", code="model_not_found")
        if req.n > cfg.max_n:
            raise APIError(400, f"n must be <= {cfg.max_n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
        if not engine.alive:
            raise APIError(503, "the generation engine is not running", type="server_error")

    def params_for(req: _Common, max_tokens: int, logprobs: bool, top: int, seed_offset: int):
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens_limit}",
                           param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                              seed=None if req.seed is None else req.seed + seed_offset, stop_token_ids=(eos,),
                              stop_strings=tuple(stops), logprobs=logprobs, top_logprobs=top)

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")

    class _Slot:
        """Counts a request against max_concurrent for as long as it runs (incl. streaming)."""

        def __init__(self):
            if state["in_flight"] >= cfg.max_concurrent:
                raise APIError(429, f"too many concurrent requests (limit {cfg.max_concurrent}); retry later",
                               type="rate_limit_error", code="rate_limit_exceeded")
            state["in_flight"] += 1
            self.open = True

        def release(self):
            if self.open:
                self.open = False
                state["in_flight"] -= 1

    def submit_all(jobs) -> list:
        loop = asyncio.get_running_loop()
        streams = []
        try:
            for ids, params in jobs:
                streams.append(engine.submit(ids, params, loop=loop))
        except (ValueError, EngineError) as e:
            for s in streams:
                s.cancel()
            raise APIError(400 if isinstance(e, ValueError) else 503, str(e))
        return streams

    async def collect(request: Request, streams) -> list[list]:
        """Wait for every stream's deltas; cancel all if the client goes away."""
        out = [[] for _ in streams]

        async def one(i, s):
            async for d in s:
                out[i].append(d)

        task = asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return out
                if await request.is_disconnected():
                    raise asyncio.CancelledError()
        except BaseException:
            for s in streams:
                s.cancel()
            task.cancel()
            raise

    async def merged(streams):
        """(index, delta) from several streams as they arrive."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, s):
            try:
                async for d in s:
                    await q.put((i, d))
            except BaseException as e:
                await q.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        left = len(streams)
        try:
            while left:
                i, d = await q.get()
                if isinstance(d, BaseException):
                    raise d
                if d.finish_reason is not None:
                    left -= 1
                yield i, d
        finally:
            for s in streams:
                s.cancel()
            for t in tasks:
                t.cancel()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_error(e: BaseException) -> str:
        msg = str(e) if isinstance(e, (EngineError, APIError)) else f"internal error: {type(e).__name__}"
        return sse(error_body(msg, "server_error"))

    def usage_counts(prompt_tokens: int, completion_tokens: int, streams=()) -> dict:
        u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
        if engine.speculative_tokens:
            # MTP speculative decoding: drafts are "predictions", in OpenAI's usage fields
            seqs = [s.seq for s in streams if s.seq is not None]
            drafted = sum(q.spec_drafted for q in seqs)
            accepted = sum(q.spec_accepted for q in seqs)
            u["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                              "rejected_prediction_tokens": drafted - accepted}
        return u

    async def collect_all(request, streams, slot):
        """A non-streaming request's results; the concurrency slot is released in any case."""
        try:
            return await collect(request, streams)
        except EngineError as e:
            raise APIError(500, str(e), type="server_error")
        finally:
            slot.release()

    def sse_response(body, streams, slot, usage=None) -> StreamingResponse:
        """The SSE tail every streaming endpoint shares: the body's chunks, an optional usage
        chunk, `data: [DONE]`, errors as an SSE error event, and -- also when the client hangs up
        -- cancelling the request's generations and releasing its concurrency slot."""

        async def events():
            try:
                async for item in body:
                    yield item
                if usage is not None:
                    yield sse(usage())
                yield "data: [DONE]\n\n"
            except (EngineError, APIError) as e:
                yield sse_error(e)
            finally:
                for s in streams:
                    s.cancel()
                slot.release()
                await body.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    def tok_str(t: int) -> str:
        return tokenizer.decode([t])

    # ---- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "engine_stopped", "model": cfg.model_name, **engine.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    def model_card():
        return {"id": cfg.model_name, "object": "model", "created": state["started"], "owned_by": "nanoseek"}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def get_model(model_id: str):
        if model_id != cfg.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    # ---- completions -----------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest, request: Request):
        check_common(req)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of", code="unsupported")
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompts) * req.n > cfg.max_n:
            raise APIError(400, f"len(prompt) * n must be <= {cfg.max_n}", param="n")
        encoded = []
        for p in prompts:
            if req.suffix is not None:
                if not isinstance(p, str):
                    raise APIError(400, "suffix needs a text prompt", param="suffix")
                ids = fim_prompt(tokenizer, p, req.suffix)
            else:
                ids = [tokenizer.bos_id] + tokenizer.encode(p) if isinstance(p, str) else list(p)
            check_prompt(ids)
            encoded.append(ids)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        nlp = req.logprobs
        jobs = [(ids, params_for(req, max_tokens, nlp is not None, nlp or 0, k))
                for ids in encoded for k in range(req.n)]
        prompt_tokens = sum(len(ids) for ids in encoded)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        slot = _Slot()
        try:
            streams = submit_all(jobs)
        except BaseException:
            slot.release()
            raise

        def logprobs_obj(deltas_or_delta, offset0: int):
            ds = deltas_or_delta if isinstance(deltas_or_delta, list) else [deltas_or_delta]
            toks, lps, tops, offs = [], [], [], []
            off = offset0
            for d in ds:
                for j, t in enumerate(d.tokens):
                    s = tok_str(t)
                    toks.append(s)
                    lps.append(d.logprobs[j] if d.logprobs else None)
                    top = None
                    if d.top_logprobs and nlp:
                        top = {}
                        for a, v in d.top_logprobs[j]:  # two ids may print alike: keep the likelier
                            top.setdefault(tok_str(a), v)
                    tops.append(top)
                    offs.append(off)
                    off += len(s)
            return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}, off

        if not req.stream:
            results = await collect_all(request, streams, slot)
            choices, completion_tokens = [], 0
            for i, ds in enumerate(results):
                text = "".join(d.text for d in ds)
                ntok = sum(len(d.tokens) for d in ds)
                completion_tokens += ntok
                choices.append({"index": i, "text": text, "finish_reason": finish(ds[-1].finish_reason),
                                "logprobs": logprobs_obj(ds, 0)[0] if nlp is not None else None})
            return {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "choices": choices, "usage": usage_counts(prompt_tokens * req.n, completion_tokens, streams)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        counted = {"completion_tokens": 0}

        async def events():
            offsets = [0] * len(streams)
            async for i, d in merged(streams):
                counted["completion_tokens"] += len(d.tokens)
                if not d.tokens and not d.text and d.finish_reason is None:
                    continue
                lp = None
                if nlp is not None:
                    lp, offsets[i] = logprobs_obj(d, offsets[i])
                yield sse({"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                           "choices": [{"index": i, "text": d.text, "logprobs": lp,
                                        "finish_reason": finish(d.finish_reason) if d.finish_reason else None}]})

        usage = None
        if include_usage:
            usage = lambda: {"id": cid, "object": "text_completion", "created": created,  # noqa: E731
                             "model": cfg.model_name, "choices": [],
                             "usage": usage_counts(prompt_tokens * req.n, counted["completion_tokens"], streams)}
        return sse_response(events(), streams, slot, usage)

    # ---- chat completions ------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_common(req)
        th = req.thinking
        if isinstance(th, dict):
            th = th.get("type") in ("enabled", True)
        mode = "thinking" if th else "chat"
        tools = req.tools if req.tool_choice != "none" else None
        try:
            pieces = chat_format.encode_pieces(req.messages, thinking_mode=mode,
                                               reasoning_effort=req.reasoning_effort if th else None,
                                               tools=tools, response_format=req.response_format)
        except (TypeError, ValueError) as e:
            raise APIError(400, f"invalid messages: {e}", param="messages")
        # Message text stays text: content spelling "<｜User｜>" must not become that token.
        ids, _ = chat_format.pieces_to_ids(pieces, tokenizer)
        check_prompt(ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
        top = req.top_logprobs or 0
        jobs = [(ids, params_for(req, max_tokens, req.logprobs, top, k)) for k in range(req.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        slot = _Slot()
        try:
            streams = submit_all(jobs)
        except BaseException:
            slot.release()
            raise

        def chat_logprobs(ds):
            content = []
            for d in ds:
                for j, t in enumerate(d.tokens):
                    s = tok_str(t)
                    content.append({"token": s, "logprob": d.logprobs[j], "bytes": list(s.encode("utf-8")),
                                    "top_logprobs": [{"token": tok_str(a), "logprob": v,
                                                      "bytes": list(tok_str(a).encode("utf-8"))}
                                                     for a, v in (d.top_logprobs[j] if d.top_logprobs else [])]})
            return {"content": content}

        def tool_calls_of(parsed):
            return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c["function"]}
                    for c in parsed["tool_calls"]]

        if not req.stream:
            results = await collect_all(request, streams, slot)
            choices, completion_tokens = [], 0
            for i, ds in enumerate(results):
                text = "".join(d.text for d in ds)
                completion_tokens += sum(len(d.tokens) for d in ds)
                parsed = chat_format.parse_completion(text, mode)
                msg = {"role": "assistant", "content": parsed["content"]}
                if mode == "thinking":
                    msg["reasoning_content"] = parsed["reasoning_content"]
                reason = finish(ds[-1].finish_reason)
                if parsed["tool_calls"]:
                    msg["tool_calls"] = tool_calls_of(parsed)
                    reason = "tool_calls"
                choices.append({"index": i, "message": msg, "finish_reason": reason,
                                "logprobs": chat_logprobs(ds) if req.logprobs else None})
            pt = len(ids) * req.n
            return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "choices": choices, "usage": usage_counts(pt, completion_tokens, streams)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i, delta, reason=None, logprobs=None):
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                        "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

        counted = {"completion_tokens": 0}

        async def events():
            splitters = [ChatStreamSplitter(mode) for _ in streams]
            texts = [""] * len(streams)
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, d in merged(streams):
                counted["completion_tokens"] += len(d.tokens)
                texts[i] += d.text
                sp = splitters[i]
                lp = chat_logprobs([d]) if req.logprobs and d.tokens else None
                if d.finish_reason is None:
                    delta = sp.feed(texts[i])
                    if delta or lp:
                        yield chunk(i, delta, logprobs=lp)
                    continue
                parsed = chat_format.parse_completion(texts[i], mode)
                delta = sp.final(parsed)
                reason = finish(d.finish_reason)
                if parsed["tool_calls"]:
                    delta["tool_calls"] = [dict(c, index=k) for k, c in enumerate(tool_calls_of(parsed))]
                    reason = "tool_calls"
                yield chunk(i, delta, reason, logprobs=lp)

        usage = None
        if include_usage:
            usage = lambda: {"id": cid, "object": "chat.completion.chunk", "created": created,  # noqa: E731
                             "model": cfg.model_name, "choices": [],
                             "usage": usage_counts(len(ids) * req.n, counted["completion_tokens"], streams)}
        return sse_response(events(), streams, slot, usage)

    app.state.engine = engine
    app.state.config = cfg
    return app


def _safe_prefix(text: str, marker: str) -> str:
    """text without a trailing piece that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text


class ChatStreamSplitter:
    """Turns the growing text of a chat turn into reasoning/content deltas for streaming.

    Thinking mode: text before </think> is reasoning. A DSML tool-call block (and the blank line
    before it) is held back and reported as tool_calls when the turn ends. Whatever is held back
    is reconciled with parse_completion() at the end, so the streamed pieces add up to exactly
    what the non-streaming response returns."""

    _OPEN = "\n\n" + chat_format._TOOL_CALLS_OPEN

    def __init__(self, mode: str):
        self.mode = mode
        self.sent_reasoning = ""
        self.sent_content = ""

    def _view(self, text: str) -> tuple[str, str]:
        reasoning, rest = "", text
        if self.mode == "thinking":
            body = text[len(chat_format.THINK_START):] if text.startswith(chat_format.THINK_START) else text
            close = body.find(chat_format.THINK_END)
            if close < 0:
                return _safe_prefix(body, chat_format.THINK_END), ""
            reasoning, rest = body[:close], body[close + len(chat_format.THINK_END):]
        cut = rest.find(chat_format._TOOL_CALLS_OPEN)
        if cut >= 0:
            content = rest[:cut]
            content = content[:-2] if content.endswith("\n\n") else content
        else:
            content = _safe_prefix(rest, self._OPEN)
        return reasoning, content

    def _delta(self, reasoning: str, content: str) -> dict:
        d = {}
        if reasoning.startswith(self.sent_reasoning) and len(reasoning) > len(self.sent_reasoning):
            d["reasoning_content"] = reasoning[len(self.sent_reasoning):]
            self.sent_reasoning = reasoning
        if content.startswith(self.sent_content) and len(content) > len(self.sent_content):
            d["content"] = content[len(self.sent_content):]
            self.sent_content = content
        return d

    def feed(self, text: str) -> dict:
        return self._delta(*self._view(text))

    def final(self, parsed: dict) -> dict:
        return self._delta(parsed.get("reasoning_content") or "", parsed.get("content") or "")


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
          tokenizer_dir: str | None = None, model_name: str | None = None, max_batch: int = 8,
          max_len: int = 4096, dtype: str | None = None, threads: int | None = None,
          config: ServeConfig | None = None, log_level: str = "info", speculative_tokens: int = 0,
          compile: bool = False) -> None:
    """Load a checkpoint + tokenizer, start the engine thread and run uvicorn until interrupted."""
    import uvicorn

    from ..engine.cli import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, tokenizer_dir, dtype=dtype, threads=threads, compile=compile)
    cfg = config or ServeConfig()
    cfg.model_name = model_name or cfg.model_name
    cfg.api_key = api_key if api_key is not None else cfg.api_key
    engine = Engine(model, tokenizer=tok, max_batch=max_batch, max_len=max_len,
                    speculative_tokens=speculative_tokens).start()
    app = create_app(engine, tok, cfg)
    print(f"nanoseek: serving '{cfg.model_name}' on http://{host}:{port}/v1 "
          f"({max_batch} slots x {max_len} tokens, cache {engine.cache_bytes() / 2**20:.1f} MiB"
          f"{f', MTP speculative decoding with {speculative_tokens} drafts' if speculative_tokens else ''}"
          f"{', API key required' if cfg.api_key else ''})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
