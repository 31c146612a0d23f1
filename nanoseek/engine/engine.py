"""Continuous batching: a background thread owns the model and a fixed set of decode slots;
requests join and leave between decode steps while the others keep decoding.

    engine = Engine(model, tokenizer=tok, max_batch=8, max_len=4096).start()
    stream = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7))
    for delta in stream:                     # blocking iteration (threads, CLI)
        print(delta.text, end="")
    # async code:  stream = engine.submit(ids, params, loop=asyncio.get_running_loop())
    #              async for delta in stream: ...
    stream.cancel()                          # from any thread; the slot is freed at the next step
    engine.stop()

submit() is thread-safe and never blocks on generation: it validates, enqueues, and returns a
RequestStream at once. The engine thread moves new requests into the BatchRunner (batch.py)
between steps, so a request joining (chunked prefill, one chunk per step) or finishing (slot
freed) never stalls the others. Per-request sampling parameters and stop conditions live in
each request's SamplingParams. The HTTP server (nanoseek/serve/app.py) is the main client.
A failure inside one request (BatchRunner's per-row isolation: its sampling, decoding, stop
strings) ends that request alone: its stream raises RequestFailed (an EngineError), the others go
on. Only a failure of the batched forward fails every request in flight; the engine keeps serving
new ones. `in_flight` counts the requests submitted and not yet finished, however they finish.
`speculative_tokens=K` turns on MTP speculative decoding for a request decoding alone (batch.py,
speculative.py); stats() then reports its acceptance rate and tokens per verification call.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback

import torch

from .batch import BatchRunner, Delta, Sequence
from .sampling import SamplingParams


class EngineError(RuntimeError):
    """Generation failed inside the engine thread (the request is finished)."""


class RequestFailed(EngineError):
    """This request alone failed (e.g. its sampling parameters cannot be computed); the engine
    and the other requests are fine."""


class RequestStream:
    """The output of one submitted request: iterate (sync or async) over its Deltas; the last
    one has `finish_reason` set. `cancel()` stops generation and frees the slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self.seq: Sequence | None = None
        self._done = False

    # called from the engine thread
    def _put(self, item) -> None:
        if self._loop is None:
            self._q.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening
            if self.seq is not None:
                self.seq.cancel()

    def cancel(self) -> None:
        if self.seq is not None:
            self.seq.cancel()

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt) if self.seq is not None else 0

    def _check(self, item) -> Delta:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    # sync consumers
    def get(self, timeout: float | None = None) -> Delta:
        return self._check(self._q.get(timeout=timeout))

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was submitted with an event loop; use `async for`")
        while not self._done:
            yield self.get()

    # async consumers
    async def aget(self) -> Delta:
        return self._check(await self._q.get())

    def __aiter__(self):
        return self._agen()

    async def _agen(self):
        if self._loop is None:
            raise TypeError("submit(..., loop=asyncio.get_running_loop()) to consume asynchronously")
        while not self._done:
            yield await self.aget()


class Engine:
    """A background generation thread over a BatchRunner (fixed `max_batch` slots of `max_len`
    tokens each). Thread-safe: submit() and RequestStream.cancel() may be called from any thread."""

    def __init__(self, model, tokenizer=None, max_batch: int = 8, max_len: int = 4096, chunk_size: int = 512,
                 cache_dtype=None, idle_wait_s: float = 0.05, speculative_tokens: int = 0, compile: bool | None = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.runner = BatchRunner(model, max_batch, max_len, chunk_size=chunk_size, cache_dtype=cache_dtype,
                                  vocab_limit=tokenizer.vocab_size if tokenizer is not None else None,
                                  speculative_tokens=speculative_tokens, compile=compile)
        self.speculative_tokens = speculative_tokens
        self.max_len = max_len
        self.max_batch = max_batch
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._live: set[Sequence] = set()  # submitted and not finished (what in_flight counts)

    # -- lifecycle ---------------------------------------------------------------------------
    def warm_up(self) -> int:
        """Compile the decode graphs before serving (BatchRunner.warm_up); call before start().
        Returns the decode steps run (0: an eager model, nothing to compile)."""
        if self._thread is not None:
            raise RuntimeError("warm_up() runs on the caller's thread: call it before start()")
        return self.runner.warm_up()

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def _in_flight(self) -> int:
        return len(self._live)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cache_bytes(self) -> int:
        return self.runner.nbytes()

    def stats(self) -> dict:
        r = self.runner
        st = r.spec_stats
        out = {"slots": self.max_batch, "active": sum(s is not None for s in r.slots), "waiting": len(r.waiting),
               "in_flight": self._in_flight, "decode_steps": r.steps, "decoded_tokens": r.decoded_tokens,
               "cache_bytes": self.cache_bytes(), "max_len": self.max_len,
               "speculative_tokens": self.speculative_tokens}
        if self.speculative_tokens:
            # rounds = verification calls; tokens per call counts the tokens those rounds emitted
            out["speculative"] = {"rounds": st.rounds, "drafted": st.drafted, "accepted": st.accepted,
                                  "acceptance_rate": round(st.acceptance_rate, 4),
                                  "tokens_per_call": round(st.tokens_per_call, 4)}
        return out

    # -- submission --------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None,
               request_id=None) -> RequestStream:
        """Queue a request; returns its RequestStream immediately. Raises ValueError for a prompt
        that can never fit (>= max_len tokens) or invalid parameters."""
        if not self.alive:
            raise EngineError("the engine is not running (call start())")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; at most {self.max_len - 1} fit this engine")
        stream = RequestStream(loop)

        def on_delta(seq, delta, stream=stream):
            if delta.finish_reason is not None:
                with self._lock:
                    self._live.discard(seq)
            stream._put(RequestFailed(delta.error) if delta.finish_reason == "error" else delta)

        seq = Sequence(prompt, params, tokenizer=self.tokenizer, on_delta=on_delta, request_id=request_id)
        stream.seq = seq
        seq.stream = stream
        with self._lock:
            self._live.add(seq)
        self._inbox.put(seq)
        return stream

    # -- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        r = self.runner
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=self._idle_wait_s) if not r.has_work() else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                try:
                    r.add(item)
                except Exception as e:  # (submit() checked it; never let one request go unanswered)
                    item.fail(f"the request could not be queued: {type(e).__name__}: {e}")
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self._stop.is_set():
                break
            if not r.has_work():
                continue
            try:
                r.step()
            except Exception as e:  # fail the requests in flight, keep serving new ones
                traceback.print_exc(file=sys.stderr)
                self._fail_all(EngineError(f"generation failed: {type(e).__name__}: {e}"))
        self._fail_all(EngineError("the engine was stopped"))

    def _fail_all(self, err: Exception) -> None:
        """End every request not finished yet (wherever it is: inbox, queue, prefill, slots)."""
        r = self.runner
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break
        r.waiting.clear()
        r.prefilling = None
        r._prefix = None
        for i, s in enumerate(r.slots):
            if s is not None:
                s.slot = None
            r.slots[i] = None
        r.cache.pos.zero_()
        with self._lock:
            seqs, self._live = list(self._live), set()
        for s in seqs:
            if not s.finished:
                s.finish_reason, s.error = "error", str(err)
                s.stream._put(err)
