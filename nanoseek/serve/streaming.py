"""Waiting on the engine from the event loop: whole results (collect), server-sent events (merged,
sse_response), client disconnects and the shutdown deadline.

A route submits its generations to the engine thread (engine.submit(..., loop=...)) and gets
RequestStreams back; their Deltas arrive through asyncio queues. A stream ends in OpenAI's chunk
format with `data: [DONE]`; a failure (this request's generation failed, the server is shutting
down) is sent as one `{"error": ...}` event and the stream still ends with `data: [DONE]`.
Whatever way a request ends -- finished, failed, client gone, shutdown -- its generations are
cancelled (their decode slots free at the next engine step) and its concurrency slot released.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import EngineError
from .protocol import APIError, error_body, server_error, shutting_down

log = logging.getLogger("nanoseek.serve")

POLL_S = 0.25  # how often a waiting request looks at its client and the shutdown deadline


class ClientGone(Exception):
    """The client hung up before its (non-streaming) answer was ready."""


class Drain:
    """The server's shutdown state: after begin(timeout), new requests are refused (503) and
    running ones have `timeout` seconds to finish before they are ended with an error."""

    def __init__(self):
        self.deadline: float | None = None

    def begin(self, timeout: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, timeout)

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(e: BaseException) -> str:
    if isinstance(e, APIError):
        return sse(error_body(e.message, e.type, e.param, e.code))
    msg = str(e) if isinstance(e, EngineError) else f"internal error: {type(e).__name__}"
    return sse(error_body(msg, "server_error"))


def as_api_error(e: EngineError) -> APIError:
    return server_error(str(e))


async def collect(request: Request, streams, drain: Drain) -> list[list]:
    """Every stream's deltas, for a non-streaming answer. Raises ClientGone if the client hangs
    up, APIError (503) once the shutdown grace period is over, APIError (500) if a generation
    failed; in each case every stream is cancelled."""
    out = [[] for _ in streams]

    async def one(i, s):
        async for d in s:
            out[i].append(d)

    task = asyncio.ensure_future(asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                task.result()
                return out
            if drain.expired():
                raise shutting_down()
            if await request.is_disconnected():
                raise ClientGone()
    except EngineError as e:
        raise as_api_error(e) from None
    finally:
        for s in streams:
            s.cancel()
        task.cancel()


async def merged(streams, drain: Drain) -> AsyncIterator[tuple[int, object]]:
    """(index, delta) from several streams as they arrive. Raises what a stream raised
    (EngineError) and APIError (503) once the shutdown grace period is over."""
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
            if drain.expired():
                raise shutting_down()
            try:
                i, d = await asyncio.wait_for(q.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                continue
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


def sse_response(body: AsyncIterator[str], streams, release: Callable[[], None],
                 usage: Callable[[], dict] | None = None) -> StreamingResponse:
    """The SSE tail every streaming endpoint shares: the body's chunks, an optional usage chunk,
    an error event if the body failed, always `data: [DONE]`; and -- also when the client hangs
    up -- cancelling the request's generations and releasing its concurrency slot."""

    async def events():
        try:
            try:
                async for item in body:
                    yield item
                if usage is not None:
                    yield sse(usage())
            except (EngineError, APIError) as e:
                log.warning("stream ended with an error: %s", e)
                yield sse_error(e)
            yield "data: [DONE]\n\n"
        finally:
            for s in streams:
                s.cancel()
            release()
            await body.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
