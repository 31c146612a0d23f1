"""The batch runner: fixed decode slots over one preallocated DecodeCache, chunked prefill,
per-row sampling and stop conditions. Single-threaded; `generate()` drives it directly and the
continuous-batching `Engine` (engine.py) drives it from its background thread.

    runner = BatchRunner(model, max_batch=8, max_len=4096, tokenizer=tok)
    seq = Sequence(prompt_ids, SamplingParams(max_new_tokens=32), on_delta=print)
    runner.add(seq)
    while runner.has_work():
        runner.step()

How a request flows (the design of vLLM / gpt-fast style continuous batching, on V4's cache):
  1. prefill: the prompt runs alone through a batch-1 scratch cache in chunks of `chunk_size`
     tokens, so a long prompt needs bounded activation memory (the cache itself is fixed-size:
     sliding-window ring + compressed entries). While other requests are decoding, one chunk runs
     per step, so a joining request never stalls the others for a whole prompt. A prompt equal
     to the one prefilled just before it (n samples of one prompt, GRPO groups) reuses that
     prefill: the scratch cache and the last logits are still there.
  2. the first token is sampled from the prompt's last logits; the scratch row is copied into a
     free slot of the batch cache (`DecodeCache.copy_row_`).
  3. decode: one forward per step over all slots, each row at its own position; each row samples
     with its own parameters and torch.Generator.
  4. a request leaves on a stop token, a stop string, max_new_tokens, cache capacity or
     cancellation; its slot is freed at once and the next waiting request can take it.
  5. a failure inside one row (its prefill, its sampling -- NaN logits, an impossible
     distribution --, its decoding or stop strings, its on_delta callback) ends that request
     alone with finish_reason "error" and `Delta.error`; the other rows, the slots and the cache
     stay as they were. Only a failure of the batched forward itself concerns every row.
Requests take the lowest free slot and a decode step runs over the slots up to the highest busy
one only (through a view of the first k rows of every cache tensor), so one request in an
8-slot engine decodes at batch-1 cost. Free slots below that still run through the forward;
their position is rewound to 0 after every step so they can never overflow the cache, and a
request taking the slot overwrites all of its state.

MTP speculative decoding (`speculative_tokens=K`, speculative.py): when exactly one sequence is
decoding, a step is a speculative round on it (K drafts from the MTP module, one verification
call on a one-row view of the cache, exact rollback), honouring its sampling parameters, stops,
max_new_tokens and log-probabilities (those of the verification call's logits). When several
sequences decode the step is the plain batched one-token step: a multi-token model call (and
its rollback) needs all of its rows at one position, and rows of a batch are at different
positions; per-row verification calls would cost more than the one batched step saves. The MTP
cache stays exact across the switch: each plain step queues the pair (H_{p-1}, token p) the MTP
would have consumed, and the queue is fed to the MTP together with the row's next first draft
(or on its own once it holds `mtp_flush` pairs, to bound its memory). The prompt feeds the MTP
during prefill.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.cache import ensure_fits
from .compiling import compile_for_decoding
from .sampling import SamplingParams, check_logits, sample_row, token_logprobs
from .speculative import SpecStats, spec_round

log = logging.getLogger("nanoseek.engine")


@dataclass
class Delta:
    """What a request released in one step: new tokens (with log-probs if asked), their text,
    and the finish reason on the last delta ("stop", "length", "cancelled", or "error" with the
    reason in `error`: that request failed alone, see BatchRunner)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


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
        self.error: str | None = None  # why generation failed (finish_reason "error")
        self.slot: int | None = None
        self.prefilled = 0
        self.next_token: int | None = None
        self._cancel = threading.Event()
        self.stop_token: int | None = None  # the stop id that ended generation, if one did
        self.stop_logprob: float | None = None  # and its log-probability (if logprobs were asked; RL trains it)
        # speculative decoding state (batch.py): streams at pos-1, MTP pairs not fed yet, counters
        self.last_h: torch.Tensor | None = None
        self.mtp_pending: list[tuple[torch.Tensor, list[int]]] = []  # (streams [1,m,n,d], m tokens)
        self.spec_rounds = 0
        self.spec_drafted = 0
        self.spec_accepted = 0

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

    def fail(self, message: str) -> None:
        """End this request with finish_reason "error": one last Delta carries the message (text
        held back for stop strings is dropped). A failing on_delta is logged, never raised."""
        if self.finished:
            return
        self.finish_reason, self.error = "error", message
        if self.on_delta is not None:
            try:
                self.on_delta(self, Delta(finish_reason="error", error=message))
            except Exception:
                log.exception("on_delta failed while reporting an error for request %s", self.request_id)

    # -- called by the runner ----------------------------------------------------------------
    def append(self, token: int, logprob: float | None, top) -> None:
        """Record one sampled token and apply the stop conditions; release what is safe."""
        p = self.params
        if token in p.stop_token_ids:
            self.stop_token = token
            self.stop_logprob = logprob
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
                 vocab_limit: int | None = None, speculative_tokens: int = 0, mtp_flush: int = 64,
                 compile: bool | None = False):
        if max_batch < 1 or max_len < 2:
            raise ValueError("max_batch must be >= 1 and max_len >= 2")
        # torch.compile of the one-token decode step (Transformer.compile_blocks; prefill stays
        # eager). Compiles lazily on the first decode steps; None = auto (engine/compiling.py).
        compile_for_decoding(model, compile)
        if not isinstance(speculative_tokens, int) or speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be an int >= 0 (0 = off), got {speculative_tokens!r}")
        if speculative_tokens and not len(getattr(model, "mtp", ())):
            raise ValueError("speculative decoding drafts with the model's MTP module, and this model has none "
                             "(num_nextn_predict_layers=0)")
        self.spec_k = speculative_tokens
        self.mtp_flush = max(1, int(mtp_flush))
        self.spec_stats = SpecStats()  # speculative rounds only (rounds = verification calls)
        self.model = model
        self.max_batch = max_batch
        self.max_len = max_len
        self.chunk_size = max(1, int(chunk_size))
        # Ids >= vocab_limit are never sampled: a model's embedding table is often padded past
        # the tokenizer's vocabulary, and those rows mean nothing.
        v = model.config.vocab_size
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < v else None
        # With speculation the caches keep K spare ring slots (rollback) and the MTP module's state.
        spec = dict(spec_tokens=self.spec_k, with_mtp=True) if self.spec_k else {}
        # both caches checked against the free memory at once, before either is allocated
        need = model.cache_nbytes(max_batch + 1, max_len, dtype=cache_dtype, **spec)
        what = f"the decode cache for {max_batch} row(s) of up to {max_len:,} tokens (with the prefill's)"
        ensure_fits(need, what, max_len, model.config, model.embed.weight.device)
        self.cache = model.new_cache(max_batch, max_len, dtype=cache_dtype, **spec)
        self.scratch = model.new_cache(1, max_len, dtype=cache_dtype, **spec)
        self.device = model.embed.weight.device
        self.slots: list[Sequence | None] = [None] * max_batch
        self._views: dict = {}  # (lo, hi) -> the cache restricted to rows lo..hi-1
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self._prefix: tuple[tuple[int, ...], torch.Tensor] | None = None  # last prefilled prompt, its logits
        self.prefill_reused = 0  # prompts served from the scratch cache of an identical previous prompt
        self.steps = 0  # decode forwards run
        self.decoded_tokens = 0  # tokens produced by decode forwards (all rows)

    # -- warm-up -----------------------------------------------------------------------------
    def warm_up(self, prompt_token: int = 0) -> int:
        """Compile a compiled model's decode graphs now rather than in the first requests: run
        two greedy requests alone, then two together (batch 1 takes the static graphs, the
        first step of a larger batch the batch-generic ones that serve every size after it),
        and forget them (statistics and the reused prefill are reset). Returns the decode steps
        run; 0 (nothing run) when the decode step is eager or requests are already queued."""
        if not getattr(self.model, "blocks_compiled", False) or self.has_work():
            return 0
        params = SamplingParams(max_new_tokens=3)  # the prefill's token, then two decode steps
        for rows in sorted({1, min(2, self.max_batch)}):
            for _ in range(rows):
                self.add(Sequence([int(prompt_token)] * 2, params))
            self.run_to_completion()
        steps = self.steps
        self.steps = self.decoded_tokens = self.prefill_reused = 0
        self.spec_stats = SpecStats()
        self._prefix = None
        return steps

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

    def run_to_completion(self) -> None:
        """Step until every added request has finished, with the model in eval mode (restored
        afterwards): the driver of callers that want whole results, not a stream."""
        was_training = self.model.training
        self.model.eval()
        try:
            while self.has_work():
                self.step()
        finally:
            self.model.train(was_training)

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
        seq.last_h, seq.mtp_pending = None, []

    def _fail_row(self, seq: Sequence, e: BaseException) -> None:
        """One request failed (its sampling, decoding, stops, callback): it leaves alone."""
        log.warning("request %s failed alone: %s: %s", seq.request_id, type(e).__name__, e,
                    exc_info=not isinstance(e, ValueError))
        if self.prefilling is seq:
            self.prefilling = None
            self._prefix = None
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._leave(seq)
        seq.fail(f"generation failed for this request: {type(e).__name__}: {e}")

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
                self._finish_guarded(s, "cancelled")
        if self.prefilling is not None and self.prefilling.cancelled:
            s, self.prefilling = self.prefilling, None
            self._finish_guarded(s, "cancelled")
        for s in self.slots:
            if s is not None and s.cancelled:
                self._leave(s)
                self._finish_guarded(s, "cancelled")

    def _finish_guarded(self, s: Sequence, reason: str) -> None:
        try:
            s._finish(reason)
        except Exception as e:  # (its on_delta, or the decoder's flush)
            self._fail_row(s, e)

    def _prefill_chunk(self) -> bool:
        """Run one prefill chunk; returns False when there was nothing to do."""
        seq = self.prefilling
        if seq is None:
            reused = False
            while True:
                while self.waiting and self.waiting[0].max_new_tokens <= 0:
                    self._finish_guarded(self.waiting.popleft(), "length")
                if not self.waiting or self._free_slot() is None:
                    return reused
                if self._prefix is None or self._prefix[0] != tuple(self.waiting[0].prompt):
                    break
                # the same prompt as the last prefill (GRPO's group samples, n > 1 completions):
                # the scratch cache still holds its state and its last logits are kept, so the
                # result is exactly a fresh prefill's, at no cost (and no chunk of the budget)
                self.prefill_reused += 1
                self._start_decoding(self.waiting.popleft(), self._prefix[1])
                reused = True
            seq = self.prefilling = self.waiting.popleft()
            self._prefix = None
            self.scratch.pos.zero_()  # every state tensor is overwritten before it is read
            for p in self.scratch.mtp_pos:
                p.zero_()
            seq.prefilled = 0
        try:
            self._prefill_forward(seq)
        except Exception as e:  # this prompt alone (the scratch cache is rewritten by the next one)
            self._fail_row(seq, e)
        return True

    def _prefill_forward(self, seq: Sequence) -> None:
        """One chunk of `seq`'s prompt through the scratch cache; the last one starts decoding."""
        lo = seq.prefilled
        hi = min(len(seq.prompt), lo + self.chunk_size)
        ids = torch.tensor([seq.prompt[lo:hi]], dtype=torch.long, device=self.device)
        if self.spec_k:
            logits, streams = self.model(ids, cache=self.scratch, return_streams=True, logits_to_keep=1)
            # MTP position t sees (H_t, token t+1), as in training: pair the chunk's tokens with
            # the streams one position earlier (the previous chunk's last H for the first one).
            h = streams[:, :-1] if lo == 0 else torch.cat([seq.last_h, streams[:, :-1]], dim=1)
            nxt = ids[:, 1:] if lo == 0 else ids
            if nxt.shape[1]:
                self.model.mtp_forward(h, nxt, cache=self.scratch)
            seq.last_h = streams[:, -1:].clone()  # (not a view that keeps the chunk's streams alive)
        else:
            logits = self.model(ids, cache=self.scratch, logits_to_keep=1)  # only the last row is sampled
        seq.prefilled = hi
        if hi < len(seq.prompt):
            return
        self.prefilling = None
        last = self._mask(logits[0, -1])
        check_logits(last)
        if not self.spec_k:   # (with speculation the row also carries MTP state: no reuse)
            self._prefix = (tuple(seq.prompt), last.clone())   # a copy: not a view keeping the chunk's logits
        self._start_decoding(seq, last)

    def _start_decoding(self, seq: Sequence, last: torch.Tensor) -> None:
        """Sample the first token from the prompt's last logits; move the scratch row into a slot."""
        try:
            tok, lp, top = sample_row(last, seq.params, seq.generator)
            seq.append(tok, lp, top)
        except Exception as e:
            self._fail_row(seq, e)
            return
        if not seq.finished:
            slot = self._free_slot()
            self.cache.copy_row_(slot, self.scratch, 0)
            self.slots[slot] = seq
            seq.slot = slot
            seq.next_token = tok

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit is not None:
            logits = logits.clone()
            logits[..., self.vocab_limit:] = float("-inf")
        return logits

    def _rows(self, k: int, lo: int = 0):
        """The cache restricted to rows lo..k-1: views, so the model's in-place writes (ring,
        compressor state, entries, positions) land in the full cache."""
        if lo == 0 and k == self.max_batch:
            return self.cache
        view = self._views.get((lo, k))
        if view is None:
            def cut(x):
                if isinstance(x, torch.Tensor):
                    return x[lo:k]
                if dataclasses.is_dataclass(x) and not isinstance(x, type):
                    return dataclasses.replace(x, **{f.name: cut(getattr(x, f.name))
                                                     for f in dataclasses.fields(x) if f.init})
                if isinstance(x, (list, tuple)):
                    return type(x)(cut(v) for v in x)
                return x

            view = self._views[(lo, k)] = cut(self.cache)
        return view

    def _decode(self) -> None:
        rows = [s for s in self.slots if s is not None]
        if self.spec_k and len(rows) == 1:
            s = rows[0]
            # drafts that fit the cache (the round feeds k+1 tokens) and the tokens still wanted
            room = self.max_len - int(self.cache.pos[s.slot]) - 1
            k = min(self.spec_k, room, s.max_new_tokens - len(s.tokens) - 1)
            if k >= 1:
                try:
                    self._spec_step(s, k)
                except Exception as e:  # the round ran on this row's one-row view only
                    self._fail_row(s, e)
                return
        k = 1 + max(s.slot for s in rows)
        toks = [0] * k  # (one tensor from a list: a decode step's Python runs on cold caches, each op counts)
        for s in rows:
            toks[s.slot] = s.next_token
        ids = torch.tensor(toks, dtype=torch.long).view(k, 1)
        if self.spec_k:
            out, streams = self.model(ids.to(self.device), cache=self._rows(k), return_streams=True)
            for s in rows:  # what the MTP would have consumed at pos-1; fed when the row drafts
                s.mtp_pending.append((s.last_h, [s.next_token]))
                s.last_h = streams[s.slot : s.slot + 1].clone()  # not a view keeping the batch's streams alive
                if sum(len(p[1]) for p in s.mtp_pending) >= self.mtp_flush:
                    self._flush_mtp(s)
        else:
            out = self.model(ids.to(self.device), cache=self._rows(k))
        logits = self._mask(out[:, 0].float().cpu())
        free = [i for i, s in enumerate(self.slots[:k]) if s is None]
        if free:
            self.cache.pos[free] = 0
        self.steps += 1
        self.decoded_tokens += len(rows)
        # every row's max (which check_logits reads: NaN if the row has one) and greedy pick, one pass
        tops, greedy_ids = (t.tolist() for t in logits.max(dim=-1))
        lps = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in rows) else None
        for s in rows:
            try:
                self._advance_row(s, logits[s.slot], greedy_ids, lps, tops[s.slot])
            except Exception as e:  # this row alone; the others keep decoding
                self._fail_row(s, e)

    def _advance_row(self, s: Sequence, row: torch.Tensor, greedy_ids, lps, row_max: float) -> None:
        lp_row = lps[s.slot] if lps is not None else None
        if s.params.greedy:
            check_logits(row, row_max)
            tok = greedy_ids[s.slot]
            lp, top = token_logprobs(row, tok, s.params, lp_row)
        else:
            tok, lp, top = sample_row(row, s.params, s.generator, lp_row, row_max)
        s.append(tok, lp, top)
        if s.finished:
            self._leave(s)
        else:
            s.next_token = tok

    # -- speculative decoding ----------------------------------------------------------------
    def _flush_mtp(self, s: Sequence) -> None:
        """Feed a row's queued (H_{t}, token t+1) pairs to the MTP cache in one call."""
        if not s.mtp_pending:
            return
        h = torch.cat([p[0] for p in s.mtp_pending], dim=1)
        ids = torch.tensor([[t for p in s.mtp_pending for t in p[1]]], dtype=torch.long, device=self.device)
        self.model.mtp_forward(h, ids, cache=self._rows(s.slot + 1, s.slot))
        s.mtp_pending = []

    def _spec_step(self, s: Sequence, k: int) -> None:
        """One speculative round (speculative.py) on the lone decoding row, through a one-row view."""
        view = self._rows(s.slot + 1, s.slot)
        emitted, a, main, s.last_h, s.mtp_pending = spec_round(self.model, view, s.last_h, s.next_token, k,
                                                               s.params, s.generator, self._mask, s.mtp_pending)
        self.steps += 1
        st = self.spec_stats
        st.rounds += 1
        st.drafted += k
        st.accepted += a
        s.spec_rounds += 1
        s.spec_drafted += k
        s.spec_accepted += a
        lps = torch.log_softmax(main, dim=-1) if s.params.logprobs else None
        n = 0
        for i, tok in enumerate(emitted):
            lp, top = token_logprobs(main[i], tok, s.params, lps[i] if lps is not None else None)
            s.append(tok, lp, top)
            n += 1
            if s.finished:
                break
        st.generated += n
        self.decoded_tokens += n
        if s.finished:
            self._leave(s)
        else:
            s.next_token = emitted[-1]
