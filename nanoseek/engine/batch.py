"""The batch runner: fixed decode slots over one preallocated DecodeCache, chunked prefill,
per-row sampling and stop conditions. Single-threaded; `generate()` drives it directly and the
continuous-batching `Engine` (scheduler.py) drives it from its background thread.

    runner = BatchRunner(model, max_batch=8, max_len=4096, tokenizer=tok)
    seq = Sequence(prompt_ids, SamplingParams(max_new_tokens=32), on_delta=print)
    runner.add(seq)
    while runner.has_work():
        runner.step()

How a request flows (the design of vLLM / gpt-fast style continuous batching, on V4's cache):
  1. prefill: the prompt runs alone through a batch-1 scratch cache in chunks of `chunk_size`
     tokens, so a long prompt needs bounded activation memory (the cache itself is fixed-size:
     sliding-window ring + compressed entries). While other requests are decoding, one chunk runs
     per step, so a joining request never stalls the others for a whole prompt.
  2. the first token is sampled from the prompt's last logits; the scratch row is copied into a
     free slot of the batch cache (`DecodeCache.copy_row_`).
  3. decode: one forward per step over all slots, each row at its own position; each row samples
     with its own parameters and torch.Generator.
  4. a request leaves on a stop token, a stop string, max_new_tokens, cache capacity or
     cancellation; its slot is freed at once and the next waiting request can take it.
Requests take the lowest free slot and a decode step runs over the slots up to the highest busy
one only (through a view of the first k rows of every cache tensor), so one request in an
8-slot engine decodes at batch-1 cost. Free slots below that still run through the forward;
their position is rewound to 0 after every step so they can never overflow the cache, and a
request taking the slot overwrites all of its state.

Extension point: a speculative drafter (e.g. V4's MTP head) would propose k tokens per row
before the decode forward and verify them in one multi-token call; that needs per-row cache
rollback, which DecodeCache does not offer yet (see docs/engine.md).
"""

from __future__ import annotations

import codecs
import dataclasses
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingParams, sample_row, token_logprobs


@dataclass
class Delta:
    """What a request released in one step: new tokens (with log-probs if asked), their text,
    and the finish reason on the last delta ("stop", "length" or "cancelled")."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str = ""
    finish_reason: str | None = None


class Sequence:
    """One request: prompt, parameters, and the generation state the runner updates.

    With a tokenizer the output is also decoded incrementally. Tokens and text are *released*
    (passed to `on_delta`) only once they cannot be part of a stop string and do not end in an
    incomplete UTF-8 character, so a stream never shows text that the final result drops.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer=None,
                 on_delta: Callable[["Sequence", Delta], None] | None = None, request_id=None):
        if len(prompt) == 0:
            raise ValueError("the prompt must hold at least one token (e.g. BOS)")
        if params.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.tokenizer = tokenizer
        self.on_delta = on_delta
        self.request_id = request_id
        self.generator = params.make_generator()
        self.max_new_tokens = params.max_new_tokens
        # generated state
        self.tokens: list[int] = []  # kept tokens (stop token excluded)
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.text = ""  # decoded text of `tokens` so far (cut at a stop string when one matched)
        self._ends: list[int] = []  # char offset in `text` where each token's text ends
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer else None
        self._released_tokens = 0
        self._released_chars = 0
        self._hold = max((len(s) for s in params.stop_strings), default=1) - 1
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.prefilled = 0
        self.next_token: int | None = None
        self._cancel = threading.Event()

    # -- public ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Thread-safe: the runner stops this request at its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- called by the runner ----------------------------------------------------------------
    def append(self, token: int, logprob: float | None, top) -> None:
        """Record one sampled token and apply the stop conditions; release what is safe."""
        p = self.params
        if token in p.stop_token_ids:
            self._finish("stop")
            return
        self.tokens.append(token)
        if p.logprobs:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top or [])
        if self._decoder is not None:
            self.text += self._decoder.decode(self.tokenizer.decode_bytes([token]))
            self._ends.append(len(self.text))
            if p.stop_strings and self._check_stop_strings():
                return
        if len(self.tokens) >= self.max_new_tokens:
            self._finish("length")
            return
        self._release(final=False)

    def _check_stop_strings(self) -> bool:
        start = max(0, self._released_chars)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop_strings) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        self.text = self.text[:cut]
        # Keep the tokens whose text lies entirely before the stop string.
        keep = sum(1 for e in self._ends if e <= cut)
        del self.tokens[keep:], self._ends[keep:]
        if self.params.logprobs:
            del self.logprobs[keep:], self.top_logprobs[keep:]
        self._finish("stop", flush=False)
        return True

    def _finish(self, reason: str, flush: bool = True) -> None:
        if self.finished:
            return
        if flush and self._decoder is not None:
            self.text += self._decoder.decode(b"", final=True)
            if self._ends:
                self._ends[-1] = len(self.text)
        self.finish_reason = reason
        self._release(final=True)

    def _release(self, final: bool) -> None:
        if final:
            n_tok, n_chr = len(self.tokens), len(self.text)
        elif self._decoder is None:
            n_tok, n_chr = len(self.tokens), 0
        else:
            n_chr = max(self._released_chars, len(self.text) - self._hold)
            n_tok = self._released_tokens
            while n_tok < len(self.tokens) and self._ends[n_tok] <= n_chr:
                n_tok += 1
            # Release text only up to the end of the released tokens, so text and tokens agree.
            n_chr = self._ends[n_tok - 1] if n_tok else 0
            n_chr = max(n_chr, self._released_chars)
        a, b = self._released_tokens, n_tok
        if b == a and n_chr == self._released_chars and not final:
            return
        d = Delta(tokens=self.tokens[a:b], text=self.text[self._released_chars:n_chr],
                  finish_reason=self.finish_reason if final else None)
        if self.params.logprobs:
            d.logprobs = self.logprobs[a:b]
            d.top_logprobs = self.top_logprobs[a:b]
        self._released_tokens, self._released_chars = b, n_chr
        if self.on_delta is not None:
            self.on_delta(self, d)


class BatchRunner:
    """Decode slots over one batch cache. Not thread-safe: one thread calls add() and step()."""

    def __init__(self, model, max_batch: int, max_len: int, chunk_size: int = 512, cache_dtype=None,
                 vocab_limit: int | None = None):
        if max_batch < 1 or max_len < 2:
            raise ValueError("max_batch must be >= 1 and max_len >= 2")
        self.model = model
        self.max_batch = max_batch
        self.max_len = max_len
        self.chunk_size = max(1, int(chunk_size))
        # Ids >= vocab_limit are never sampled: a model's embedding table is often padded past
        # the tokenizer's vocabulary, and those rows mean nothing.
        v = model.config.vocab_size
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < v else None
        self.cache = model.new_cache(max_batch, max_len, dtype=cache_dtype)
        self.scratch = model.new_cache(1, max_len, dtype=cache_dtype)
        self.device = model.embed.weight.device
        self.slots: list[Sequence | None] = [None] * max_batch
        self._views: dict = {}  # k -> the cache restricted to its first k rows
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.steps = 0  # decode forwards run
        self.decoded_tokens = 0  # tokens produced by decode forwards (all rows)

    # -- bookkeeping -------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Memory held by the batch cache plus the prefill scratch cache."""
        return self.cache.nbytes() + self.scratch.nbytes()

    def add(self, seq: Sequence) -> None:
        if len(seq.prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(seq.prompt)} tokens; this engine holds at most "
                             f"{self.max_len - 1} prompt tokens (max_len={self.max_len})")
        # The cache holds prompt + all fed-back tokens (the last sampled token is never fed).
        seq.max_new_tokens = min(seq.max_new_tokens, self.max_len - len(seq.prompt) + 1)
        self.waiting.append(seq)

    def active(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or any(s is not None for s in self.slots))

    def _free_slot(self) -> int | None:
        for i, s in enumerate(self.slots):
            if s is None:
                return i
        return None

    def _leave(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.slots[seq.slot] = None
            self.cache.pos[seq.slot] = 0
            seq.slot = None

    # -- one engine step ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, advance prefill (one chunk if others decode, else whole
        prompts while slots are free), then run one decode forward over the slots."""
        self._reap_cancelled()
        decoding = any(s is not None for s in self.slots)
        budget = 1 if decoding else None  # chunks this step; None = until no slot is free
        while budget is None or budget > 0:
            if not self._prefill_chunk():
                break
            if budget is not None:
                budget -= 1
        if any(s is not None for s in self.slots):
            self._decode()

    def _reap_cancelled(self) -> None:
        for s in list(self.waiting):
            if s.cancelled:
                self.waiting.remove(s)
                s._finish("cancelled")
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling._finish("cancelled")
            self.prefilling = None
        for s in self.slots:
            if s is not None and s.cancelled:
                self._leave(s)
                s._finish("cancelled")

    def _prefill_chunk(self) -> bool:
        """Run one prefill chunk; returns False when there was nothing to do."""
        seq = self.prefilling
        if seq is None:
            while self.waiting and self.waiting[0].max_new_tokens <= 0:
                self.waiting.popleft()._finish("length")
            if not self.waiting or self._free_slot() is None:
                return False
            seq = self.prefilling = self.waiting.popleft()
            self.scratch.pos.zero_()  # every state tensor is overwritten before it is read
            seq.prefilled = 0
        lo = seq.prefilled
        hi = min(len(seq.prompt), lo + self.chunk_size)
        ids = torch.tensor([seq.prompt[lo:hi]], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=self.scratch)
        seq.prefilled = hi
        if hi < len(seq.prompt):
            return True
        self.prefilling = None
        last = self._mask(logits[0, -1])
        tok, lp, top = sample_row(last, seq.params, seq.generator)
        seq.append(tok, lp, top)
        if not seq.finished:
            slot = self._free_slot()
            self.cache.copy_row_(slot, self.scratch, 0)
            self.slots[slot] = seq
            seq.slot = slot
            seq.next_token = tok
        return True

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit is not None:
            logits = logits.clone()
            logits[..., self.vocab_limit:] = float("-inf")
        return logits

    def _rows(self, k: int):
        """The cache restricted to its first k rows: views, so the model's in-place writes
        (ring, compressor state, entries, positions) land in the full cache."""
        if k == self.max_batch:
            return self.cache
        view = self._views.get(k)
        if view is None:
            def cut(x):
                if isinstance(x, torch.Tensor):
                    return x[:k]
                if dataclasses.is_dataclass(x) and not isinstance(x, type):
                    return dataclasses.replace(x, **{f.name: cut(getattr(x, f.name))
                                                     for f in dataclasses.fields(x) if f.init})
                if isinstance(x, (list, tuple)):
                    return type(x)(cut(v) for v in x)
                return x

            view = self._views[k] = cut(self.cache)
        return view

    def _decode(self) -> None:
        rows = [s for s in self.slots if s is not None]
        k = 1 + max(s.slot for s in rows)
        ids = torch.zeros(k, 1, dtype=torch.long)
        for s in rows:
            ids[s.slot, 0] = s.next_token
        logits = self._mask(self.model(ids.to(self.device), cache=self._rows(k))[:, 0].float().cpu())
        free = [i for i, s in enumerate(self.slots[:k]) if s is None]
        if free:
            self.cache.pos[free] = 0
        self.steps += 1
        self.decoded_tokens += len(rows)
        greedy_ids = torch.argmax(logits, dim=-1).tolist() if any(s.params.greedy for s in rows) else None
        lps = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in rows) else None
        for s in rows:
            row = logits[s.slot]
            lp_row = lps[s.slot] if lps is not None else None
            if s.params.greedy:
                tok = greedy_ids[s.slot]
                lp, top = token_logprobs(row, tok, s.params, lp_row)
            else:
                tok, lp, top = sample_row(row, s.params, s.generator, lp_row)
            s.append(tok, lp, top)
            if s.finished:
                self._leave(s)
            else:
                s.next_token = tok
