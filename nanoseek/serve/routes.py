"""The server's routes: one APIRouter; what a route needs (engine, tokenizer, config, counters) is
the ServerState on `app.state.server`, which create_app (app.py) sets.

    GET  /health                 liveness for anyone; load counters with the API key
    GET  /v1/models, /v1/models/{id}
    POST /v1/completions         prompt (text, texts, ids), suffix -> fill-in-the-middle, logprobs
    POST /v1/chat/completions    messages, tools -> DSML, thinking -> reasoning_content

The HTTP layer never runs the model: requests are queued to the engine thread and their tokens
come back through asyncio queues (streaming.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .. import chat_format
from ..engine import EngineError
from ..engine.generate import fim_prompt
from ..engine.sampling import SamplingParams
from .protocol import (SEED_LIMIT, APIError, ChatCompletionRequest, CommonRequest, CompletionRequest, ServeConfig,
                       check_strings, finish_reason, shutting_down, usage)
from .streaming import ClientGone, Drain, collect, merged, sse, sse_response

log = logging.getLogger("nanoseek.serve")
router = APIRouter()


class ServerState:
    """What the routes share: the engine, the tokenizer, the config, the concurrency counter and
    the shutdown state. Lives on `app.state.server`."""

    def __init__(self, engine, tokenizer, cfg: ServeConfig):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.max_prompt = min(cfg.max_prompt_tokens or engine.max_len - 1, engine.max_len - 1)
        self.in_flight = 0
        self.started = int(time.time())
        self.drain = Drain()

    def authorized(self, request: Request) -> bool:
        if self.cfg.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.cfg.api_key.encode())

    def acquire(self):
        """Count a request against max_concurrent; returns its (idempotent) release function."""
        if self.drain.draining:
            raise shutting_down()
        if self.in_flight >= self.cfg.max_concurrent:
            raise APIError(429, f"too many concurrent requests (limit {self.cfg.max_concurrent}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})
        self.in_flight += 1
        held = [True]

        def release():
            if held[0]:
                held[0] = False
                self.in_flight -= 1

        return release

    def tok_str(self, t: int) -> str:
        return self.tokenizer.decode([t])


def server(request: Request) -> ServerState:
    return request.app.state.server


# -------------------------------------------------------------------------------------------
# Shared request handling
# -------------------------------------------------------------------------------------------


def check_common(st: ServerState, req: CommonRequest, body: dict) -> None:
    check_strings(body)
    cfg = st.cfg
    if req.model != cfg.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{cfg.model_name}'",
                       param="model", code="model_not_found")
    if req.n > cfg.max_n:
        raise APIError(400, f"n must be <= {cfg.max_n}", param="n")
    if req.seed is not None and req.seed + req.n > SEED_LIMIT:
        raise APIError(400, "seed + n must be <= 2**63 (one seed per choice)", param="seed")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
    if st.drain.draining:
        raise shutting_down()
    if not st.engine.alive:
        raise APIError(503, "the generation engine is not running", type="server_error")


def sampling_params(st: ServerState, req: CommonRequest, max_tokens: int, logprobs: bool, top: int, k: int):
    """SamplingParams of choice k of a request (seed + k, so n seeded choices differ)."""
    if max_tokens > st.cfg.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {st.cfg.max_tokens_limit}",
                       param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                              seed=None if req.seed is None else req.seed + k, stop_token_ids=(st.tokenizer.eos_id,),
                              stop_strings=tuple(stops), logprobs=logprobs, top_logprobs=top)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def check_prompt(st: ServerState, ids: list[int]) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(ids) > st.max_prompt:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {st.max_prompt}",
                       param="prompt", code="context_length_exceeded")
    bad = [t for t in ids if not 0 <= t < st.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")


def submit_all(st: ServerState, jobs) -> tuple[list, object]:
    """Take a concurrency slot and queue every (ids, params); returns (streams, release)."""
    release = st.acquire()
    loop = asyncio.get_running_loop()
    streams = []
    try:
        for ids, params in jobs:
            streams.append(st.engine.submit(ids, params, loop=loop))
    except BaseException as e:
        for s in streams:
            s.cancel()
        release()
        if isinstance(e, (ValueError, EngineError)):
            raise APIError(400 if isinstance(e, ValueError) else 503, str(e)) from None
        raise
    return streams, release


async def collect_or_gone(request: Request, st: ServerState, streams, release):
    """A non-streaming request's deltas per choice, or None if the client hung up."""
    try:
        return await collect(request, streams, st.drain)
    except ClientGone:
        log.info("client disconnected before its answer; request cancelled")
        return None
    finally:
        release()


def gone() -> Response:
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


def usage_of(st: ServerState, prompt_tokens: int, completion_tokens: int, streams) -> dict:
    return usage(prompt_tokens, completion_tokens, [s.seq for s in streams if s.seq is not None],
                 speculative=bool(st.engine.speculative_tokens))


# -------------------------------------------------------------------------------------------
# Health and models
# -------------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request):
    """`{"status"}` for anyone (liveness); the model and the engine's counters with the API key."""
    st = server(request)
    ok = st.engine.alive and not st.drain.draining
    status = "ok" if ok else ("shutting_down" if st.drain.draining else "engine_stopped")
    body = {"status": status}
    if st.authorized(request):
        body.update(model=st.cfg.model_name, **st.engine.stats(), http_in_flight=st.in_flight)
    return JSONResponse(body, status_code=200 if ok else 503)


def model_card(st: ServerState) -> dict:
    return {"id": st.cfg.model_name, "object": "model", "created": st.started, "owned_by": "nanoseek"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(server(request))]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    st = server(request)
    check_strings(model_id, "model")
    if model_id != st.cfg.model_name:
        raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
    return model_card(st)


# -------------------------------------------------------------------------------------------
# Completions
# -------------------------------------------------------------------------------------------


def completion_prompts(st: ServerState, req: CompletionRequest) -> list[list[int]]:
    """The request's prompts as token ids (text gets BOS; a suffix makes a FIM prompt)."""
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo", code="unsupported")
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of", code="unsupported")
    p = req.prompt
    prompts = [p] if isinstance(p, str) else [list(p)] if p and all(isinstance(x, int) for x in p) else list(p)
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompts) * req.n > st.cfg.max_n:
        raise APIError(400, f"len(prompt) * n must be <= {st.cfg.max_n}", param="n")
    encoded = []
    for p in prompts:
        if req.suffix is not None:
            if not isinstance(p, str):
                raise APIError(400, "suffix needs a text prompt", param="suffix")
            ids = fim_prompt(st.tokenizer, p, req.suffix)
        else:
            ids = [st.tokenizer.bos_id] + st.tokenizer.encode(p) if isinstance(p, str) else list(p)
        check_prompt(st, ids)
        encoded.append(ids)
    return encoded


def completion_logprobs(st: ServerState, deltas, offset0: int, top_n: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for some deltas; returns it and the next text offset."""
    toks, lps, tops, offs = [], [], [], []
    off = offset0
    for d in deltas:
        for j, t in enumerate(d.tokens):
            s = st.tok_str(t)
            toks.append(s)
            lps.append(d.logprobs[j] if d.logprobs else None)
            top = None
            if d.top_logprobs and top_n:
                top = {}
                for a, v in d.top_logprobs[j]:  # two ids may print alike: keep the likelier
                    top.setdefault(st.tok_str(a), v)
            tops.append(top)
            offs.append(off)
            off += len(s)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}, off


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    st = server(request)
    check_common(st, req, req.model_dump())
    encoded = completion_prompts(st, req)
    # (a default never exceeds the server's limit: only what the client asked for is refused)
    max_tokens = min(16, st.cfg.max_tokens_limit) if req.max_tokens is None else req.max_tokens
    nlp = req.logprobs
    jobs = [(ids, sampling_params(st, req, max_tokens, nlp is not None, nlp or 0, k))
            for ids in encoded for k in range(req.n)]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": st.cfg.model_name}
    prompt_tokens = sum(len(ids) for ids in encoded)  # each prompt once, whatever n (as OpenAI, vLLM)
    streams, release = submit_all(st, jobs)
    if req.stream:
        return completion_stream(st, req, head, prompt_tokens, streams, release)
    results = await collect_or_gone(request, st, streams, release)
    if results is None:
        return gone()
    choices, completion_tokens = [], 0
    for i, ds in enumerate(results):
        completion_tokens += sum(len(d.tokens) for d in ds)
        choices.append({"index": i, "text": "".join(d.text for d in ds),
                        "finish_reason": finish_reason(ds[-1].finish_reason),
                        "logprobs": completion_logprobs(st, ds, 0, nlp)[0] if nlp is not None else None})
    return {**head, "choices": choices, "usage": usage_of(st, prompt_tokens, completion_tokens, streams)}


def completion_stream(st: ServerState, req: CompletionRequest, head: dict, prompt_tokens: int, streams, release):
    counted = [0]
    nlp = req.logprobs

    async def events():
        offsets = [0] * len(streams)
        async for i, d in merged(streams, st.drain):
            counted[0] += len(d.tokens)
            if not d.tokens and not d.text and d.finish_reason is None:
                continue
            lp = None
            if nlp is not None:
                lp, offsets[i] = completion_logprobs(st, [d], offsets[i], nlp)
            reason = finish_reason(d.finish_reason) if d.finish_reason else None
            yield sse({**head, "choices": [{"index": i, "text": d.text, "logprobs": lp, "finish_reason": reason}]})

    final = None
    if req.include_usage:
        final = lambda: {**head, "choices": [], "usage": usage_of(st, prompt_tokens, counted[0], streams)}  # noqa: E731
    return sse_response(events(), streams, release, final)


# -------------------------------------------------------------------------------------------
# Chat completions
# -------------------------------------------------------------------------------------------


def chat_prompt(st: ServerState, req: ChatCompletionRequest) -> list[int]:
    """The conversation as token ids (DeepSeek-V4 chat encoding; message text stays text)."""
    mode = req.thinking_mode
    tools = req.tools if req.tool_choice != "none" else None
    try:
        pieces = chat_format.encode_pieces(req.messages, thinking_mode=mode,
                                           reasoning_effort=req.reasoning_effort if mode == "thinking" else None,
                                           tools=tools, response_format=req.response_format)
    except (TypeError, ValueError) as e:
        raise APIError(400, f"invalid messages: {e}", param="messages") from None
    # Message text stays text: content spelling "<｜User｜>" must not become that token.
    ids, _ = chat_format.pieces_to_ids(pieces, st.tokenizer)
    check_prompt(st, ids)
    return ids


def chat_logprobs(st: ServerState, deltas) -> dict:
    content = []
    for d in deltas:
        for j, t in enumerate(d.tokens):
            s = st.tok_str(t)
            tops = d.top_logprobs[j] if d.top_logprobs else []
            content.append({"token": s, "logprob": d.logprobs[j], "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": st.tok_str(a), "logprob": v,
                                              "bytes": list(st.tok_str(a).encode("utf-8"))} for a, v in tops]})
    return {"content": content}


def tool_calls_of(parsed: dict) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c["function"]}
            for c in parsed["tool_calls"]]


def chat_choice(st: ServerState, req: ChatCompletionRequest, i: int, ds) -> dict:
    parsed = chat_format.parse_completion("".join(d.text for d in ds), req.thinking_mode)
    msg = {"role": "assistant", "content": parsed["content"]}
    if req.thinking_mode == "thinking":
        msg["reasoning_content"] = parsed["reasoning_content"]
    reason = finish_reason(ds[-1].finish_reason)
    if parsed["tool_calls"]:
        msg["tool_calls"] = tool_calls_of(parsed)
        reason = "tool_calls"
    return {"index": i, "message": msg, "finish_reason": reason,
            "logprobs": chat_logprobs(st, ds) if req.logprobs else None}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    st = server(request)
    check_common(st, req, req.model_dump())
    ids = chat_prompt(st, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(st.cfg.default_max_tokens, st.cfg.max_tokens_limit) if max_tokens is None else max_tokens
    jobs = [(ids, sampling_params(st, req, max_tokens, req.logprobs, req.top_logprobs or 0, k)) for k in range(req.n)]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": st.cfg.model_name}
    streams, release = submit_all(st, jobs)
    if req.stream:
        return chat_stream(st, req, head, len(ids), streams, release)
    results = await collect_or_gone(request, st, streams, release)
    if results is None:
        return gone()
    choices = [chat_choice(st, req, i, ds) for i, ds in enumerate(results)]
    completion_tokens = sum(len(d.tokens) for ds in results for d in ds)
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage_of(st, len(ids), completion_tokens, streams)}


def chat_stream(st: ServerState, req: ChatCompletionRequest, head: dict, prompt_tokens: int, streams, release):
    head = {**head, "object": "chat.completion.chunk"}
    mode = req.thinking_mode
    counted = [0]

    def chunk(i, delta, reason=None, logprobs=None):
        return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

    async def events():
        splitters = [chat_format.ChatStreamSplitter(mode) for _ in streams]
        texts = [""] * len(streams)
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, d in merged(streams, st.drain):
            counted[0] += len(d.tokens)
            texts[i] += d.text
            lp = chat_logprobs(st, [d]) if req.logprobs and d.tokens else None
            if d.finish_reason is None:
                delta = splitters[i].feed(texts[i])
                if delta or lp:
                    yield chunk(i, delta, logprobs=lp)
                continue
            parsed = chat_format.parse_completion(texts[i], mode)
            delta, reason = splitters[i].final(parsed), finish_reason(d.finish_reason)
            if parsed["tool_calls"]:
                delta["tool_calls"] = [dict(c, index=k) for k, c in enumerate(tool_calls_of(parsed))]
                reason = "tool_calls"
            yield chunk(i, delta, reason, logprobs=lp)

    final = None
    if req.include_usage:
        final = lambda: {**head, "choices": [], "usage": usage_of(st, prompt_tokens, counted[0], streams)}  # noqa: E731
    return sse_response(events(), streams, release, final)
