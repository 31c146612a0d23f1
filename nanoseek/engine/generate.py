"""Text generation with a DeepSeek-V4 model: `generate`, `generate_stream`, fill-in-the-middle.

    from nanoseek import Transformer, generate
    model = Transformer.from_pretrained("runs/ckpt").eval()
    out = generate(model, [0, 512, 77], max_new_tokens=32)               # -> list[int]
    outs = generate(model, [[0, 5], [0, 9, 9, 9]], max_new_tokens=32,    # ragged batch
                    temperature=0.8, top_p=0.95, seed=1)                 # -> list[list[int]]
    for ev in generate_stream(model, ids, 64, tokenizer=tok): print(ev.text, end="")
    middle = fill_in_middle(model, tok, "def add(a, b):\\n    return ", "\\n")

Prompts of different lengths are prefilled one at a time (each into a batch-1 cache, in chunks
of `chunk_size` tokens) and copied into one batch cache, then all rows decode together, each at
its own position (see batch.py). Every row has its own torch.Generator (seed + row index), so a
seeded call is reproducible and a row's tokens do not depend on what else is in the batch.
`speculative_tokens=K` turns on MTP speculative decoding (speculative.py; greedy output is
unchanged, sampled output keeps its distribution but a seeded row's tokens then depend on when
it decoded alone, i.e. speculatively).

With a tokenizer, ids the tokenizer does not have (a padded embedding table) are never sampled.
Stops: the model's EOS (config.eos_token_id) unless `stop_on_eos=False`, plus `stop`: token ids
(int) and/or strings (str, matched on the decoded text; needs `tokenizer`). The stop token is
not part of the output; for a stop string the output keeps the tokens whose text lies entirely
before the match.

FIM (PSM layout, as the tokenizer's FIM_LAYOUTS and DeepSeek-Coder):
    <BOS><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>  -> the model writes {middle}<EOS>
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from .batch import BatchRunner, Delta, Sequence
from .compiling import compile_for_decoding, decode_capacity
from .sampling import SamplingParams
from .speculative import SpecStats

DEFAULT_CHUNK = 512


@dataclass
class StreamEvent:
    """One release of a request's output (see batch.Delta): `index` is the row in the batch."""

    index: int
    tokens: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str | None

    @property
    def token(self) -> int | None:
        return self.tokens[-1] if self.tokens else None


@dataclass
class Completion:
    """The finished output of one row."""

    tokens: list[int]
    text: str | None
    logprobs: list[float] | None
    top_logprobs: list | None
    finish_reason: str
    prompt_tokens: int
    cache_bytes: int = 0  # memory of the decode caches the call allocated (batch + prefill scratch)
    spec_drafted: int = 0  # speculative decoding: MTP drafts proposed for this row,
    spec_accepted: int = 0  # how many the main model accepted,
    spec_rounds: int = 0  # and verification calls run on it


def _as_prompts(input_ids) -> tuple[list[list[int]], bool]:
    """(list of prompts, was_batched). Accepts a 1-D/2-D tensor, a list of ints or of lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            return [input_ids.tolist()], False
        if input_ids.dim() == 2:
            return input_ids.tolist(), True
        raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be a non-empty list of token ids or of prompts")
    if all(isinstance(x, int) for x in input_ids):
        return [list(input_ids)], False
    prompts = []
    for p in input_ids:
        p = p.tolist() if isinstance(p, torch.Tensor) else p
        if not isinstance(p, (list, tuple)) or not all(isinstance(x, int) for x in p):
            raise ValueError("input_ids must be a list of ints or a list of lists of ints")
        prompts.append(list(p))
    return prompts, True


def _split_stop(stop, eos: int | None, stop_on_eos: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    ids, strs = [], []
    if stop is not None:
        for s in [stop] if isinstance(stop, (int, str)) else stop:
            if isinstance(s, bool) or not isinstance(s, (int, str)):
                raise ValueError(f"stop entries must be token ids (int) or strings, got {s!r}")
            (strs if isinstance(s, str) else ids).append(s)
    if stop_on_eos and eos is not None:
        ids.append(int(eos))
    return tuple(ids), tuple(strs)


def _run(model, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs, top_logprobs,
         tokenizer, stop_on_eos, chunk_size, max_len, cache_dtype, info=None,
         speculative_tokens: int = 0, compile: bool | None = None) -> Iterator[tuple[int, Delta, Sequence]]:
    prompts, _ = _as_prompts(input_ids)
    stop_ids, stop_strs = _split_stop(stop, getattr(model.config, "eos_token_id", None), stop_on_eos)
    need = max(len(p) for p in prompts) + max(max_new_tokens, 1)
    _warn_past_context(model, need)
    if max_len is None:  # just enough, rounded up to a bucket if the decode step is compiled
        compile_for_decoding(model, compile)  # (the runner would; the capacity depends on it)
        max_len = decode_capacity(model, need)
    runner = BatchRunner(model, len(prompts), max_len, chunk_size=chunk_size, cache_dtype=cache_dtype,
                         vocab_limit=tokenizer.vocab_size if tokenizer is not None else None,
                         speculative_tokens=speculative_tokens, compile=compile)
    if info is not None:
        info["cache_bytes"] = runner.nbytes()
        info["runner"] = runner
    out: list[tuple[int, Delta, Sequence]] = []
    seqs = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=None if seed is None else seed + i, stop_token_ids=stop_ids,
                                stop_strings=stop_strs, logprobs=logprobs, top_logprobs=top_logprobs)
        seq = Sequence(p, params, tokenizer=tokenizer, on_delta=lambda s, d, i=i: out.append((i, d, s)))
        runner.add(seq)
        seqs.append(seq)
    was_training = model.training
    model.eval()
    try:
        while runner.has_work():
            runner.step()
            yield from out
            out.clear()
    finally:
        model.train(was_training)
        for s in seqs:  # a closed stream cancels the rest
            s.cancel()


def _warn_past_context(model, need: int) -> None:
    """A warning when a call may run past the positions the model was built for (as the
    server's --max-model-len warning; transformers warns alike)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and need > limit:
        warnings.warn(f"the prompt and max_new_tokens can reach position {need:,}, past the model's "
                      f"max_position_embeddings={limit:,}: positions beyond it are untrained extrapolation",
                      stacklevel=4)


def generate_full(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int | None = None, stop=None, logprobs: bool = False, *,
                  top_logprobs: int = 0, tokenizer=None, stop_on_eos: bool = True,
                  chunk_size: int = DEFAULT_CHUNK, max_len: int | None = None, cache_dtype=None,
                  speculative_tokens: int = 0, compile: bool | None = None) -> list[Completion]:
    """Like `generate` but returns a Completion (tokens, text, logprobs, finish_reason) per prompt."""
    done: dict[int, Sequence] = {}
    info: dict = {}
    for i, d, s in _run(model, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs,
                        top_logprobs, tokenizer, stop_on_eos, chunk_size, max_len, cache_dtype, info,
                        speculative_tokens, compile):
        if d.finish_reason is not None:
            done[i] = s
    return [Completion(tokens=s.tokens, text=s.text if tokenizer is not None else None,
                       logprobs=s.logprobs if s.params.logprobs else None,
                       top_logprobs=s.top_logprobs if s.params.top_logprobs else None,
                       finish_reason=s.finish_reason, prompt_tokens=len(s.prompt), cache_bytes=info["cache_bytes"],
                       spec_drafted=s.spec_drafted, spec_accepted=s.spec_accepted, spec_rounds=s.spec_rounds)
            for _, s in sorted(done.items())]


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop=None, logprobs: bool = False, **kw):
    """Generated token ids: list[int] for one prompt (list of ints / 1-D tensor), list[list[int]]
    for a batch (list of lists, ragged allowed / 2-D tensor). With logprobs=True returns
    (ids, logprobs) with the same nesting. Keyword options: tokenizer (for stop strings),
    stop_on_eos=True, chunk_size=512, max_len (cache capacity; default just enough, rounded up to a
    bucket when the decode step is compiled: compiling.decode_capacity),
    top_logprobs, cache_dtype, speculative_tokens (MTP drafts per round, 0 = off; see
    speculative.py), compile (torch.compile the decode step: Transformer.compile_blocks; None =
    auto, on where a compiler exists, see engine/compiling.py; False = eager).
    See the module docstring."""
    _, batched = _as_prompts(input_ids)
    res = generate_full(model, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs, **kw)
    ids = [c.tokens for c in res]
    lps = [c.logprobs for c in res]
    if not batched:
        ids, lps = ids[0], lps[0]
    return (ids, lps) if logprobs else ids


def generate_stream(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, seed: int | None = None, stop=None, logprobs: bool = False, *,
                    top_logprobs: int = 0, tokenizer=None, stop_on_eos: bool = True,
                    chunk_size: int = DEFAULT_CHUNK, max_len: int | None = None,
                    cache_dtype=None, speculative_tokens: int = 0, info: dict | None = None,
                    compile: bool | None = None) -> Iterator[StreamEvent]:
    """Yield StreamEvents (index, tokens, text, logprobs, finish_reason) as tokens are produced.
    Each row's last event has finish_reason set. Closing the generator stops generation.
    `info` (a dict) receives "cache_bytes" and "runner" (its .spec_stats, .steps) when given."""
    for i, d, _ in _run(model, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs,
                        top_logprobs, tokenizer, stop_on_eos, chunk_size, max_len, cache_dtype, info,
                        speculative_tokens, compile):
        yield StreamEvent(index=i, tokens=d.tokens, text=d.text, logprobs=d.logprobs, finish_reason=d.finish_reason)


# -------------------------------------------------------------------------------------------
# Fill-in-the-middle
# -------------------------------------------------------------------------------------------

def fim_prompt(tokenizer, prefix: str, suffix: str) -> list[int]:
    """PSM prompt ids: BOS, fim_begin, prefix, fim_hole, suffix, fim_end (the model then writes
    the middle and EOS). Prefix/suffix text is encoded as plain text (special strings inert)."""
    t = tokenizer
    for name in ("fim_begin_id", "fim_hole_id", "fim_end_id"):
        if getattr(t, name, None) is None:
            raise ValueError(f"the tokenizer has no {name[:-3]} token; FIM needs a nanoseek tokenizer")
    ids = [t.bos_id, t.fim_begin_id] + t.encode(prefix) + [t.fim_hole_id] + t.encode(suffix) + [t.fim_end_id]
    return ids


def fill_in_middle(model, tokenizer, prefix: str, suffix: str, max_new_tokens: int = 128, **kw) -> str:
    """The generated middle between `prefix` and `suffix` (generation ends at EOS)."""
    res = generate_full(model, fim_prompt(tokenizer, prefix, suffix), max_new_tokens, tokenizer=tokenizer, **kw)
    return res[0].text


def warm_up_decode(model, need: int) -> None:
    """Compile a compiled model's batch-1 decode graphs for calls of up to `need` tokens (their
    cache bucket, compiling.decode_capacity; BatchRunner.warm_up); nothing for an eager model.
    `nanoseek chat` runs it in the background while the first message is typed."""
    if getattr(model, "blocks_compiled", False):
        BatchRunner(model, 1, decode_capacity(model, need)).warm_up()


@torch.no_grad()
def speculative_generate(model, prompt_ids, max_new_tokens: int, num_draft: int = 2,
                         stop_ids: tuple[int, ...] | None = None, temperature: float = 0.0, top_p: float = 1.0,
                         top_k: int = 0, seed: int | None = None) -> tuple[list[int], SpecStats]:
    """Generate for one prompt with MTP speculative decoding; returns (token ids, SpecStats).
    Stops at `stop_ids` (default: the model's EOS; the stop token is included in the output, as
    before). Greedy when temperature == 0, otherwise speculative sampling (seeded if `seed`)."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).tolist()  # [S] or [1, S]
    if not prompt:
        raise ValueError("empty prompt")
    stop = tuple(stop_ids if stop_ids is not None else (model.config.eos_token_id,))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop_token_ids=stop)
    runner = BatchRunner(model, 1, decode_capacity(model, len(prompt) + max(max_new_tokens, 1)),
                         speculative_tokens=num_draft)
    seq = Sequence(prompt, params)
    runner.add(seq)
    runner.run_to_completion()
    out = list(seq.tokens)
    if seq.stop_token is not None:
        out.append(seq.stop_token)
    st = runner.spec_stats
    return out, SpecStats(rounds=runner.steps + 1, drafted=st.drafted, accepted=st.accepted, generated=len(out))
