"""Sampling: per-request parameters and next-token selection from logits.

    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, top_k=50, seed=1234)
    g = params.make_generator()
    token, logprob, top = sample_row(logits_row, params, g)

Greedy decoding is `temperature == 0` (argmax; ties go to the lowest id, as torch.argmax does).
Otherwise logits are divided by the temperature, cut to the `top_k` most likely tokens, then to
the smallest set whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020,
"The Curious Case of Neural Text Degeneration"), and one token is drawn with the request's own
`torch.Generator`, so a seeded request gives the same tokens whatever else shares its batch.

Reported log-probabilities are those of the model's distribution (log_softmax of the raw
logits, temperature 1), as OpenAI's API reports them, not of the truncated sampling distribution;
`logprobs_mode="sampled"` reports the distribution the token was drawn from instead (after
temperature, top-k and top-p; 0 for a greedy pick), which is what an importance weight against
the sampler needs (RL rollouts: train/rollouts.py). With the default sampling (temperature 1, no
cut) the two are the same numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20
LOGPROBS_MODES = ("model", "sampled")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # generation ends on these ids (not included in the output)
    stop_strings: tuple[str, ...] = ()  # needs a tokenizer; the output text is cut before the match
    logprobs: bool = False  # report the chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives
    logprobs_mode: str = "model"  # "model": the raw distribution; "sampled": the one drawn from (top)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)
        if self.top_logprobs:
            self.logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator:
        """A CPU generator for this request: seeded if a seed was given, from the OS otherwise."""
        g = torch.Generator(device="cpu")
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        g.manual_seed(int(seed) & ((1 << 63) - 1))
        return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature-scaled logits [V] with everything outside top-k / top-p set to -inf.

    Numerically safe for any temperature > 0 and top_p > 0 (1e-300 included): the logits are
    shifted so their maximum is 0 before the division, which runs in float64, when the
    temperature is small enough for float32 to overflow (or round it to 0): the others then
    become -inf instead of the maximum inf (nan after softmax). The most likely token always
    survives the nucleus cut."""
    x = logits.float()
    if temperature >= 1e-4:  # |logit| / t stays far below float32's max: the plain division
        x = x / temperature
    else:
        x = ((x - x.max()).double() / float(temperature)).float()
    v = x.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        x = nucleus(x, top_p)
    return x


NUCLEUS_FIRST = 64  # candidates nucleus() looks at first (then 4x more at a time)


def nucleus(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits x [V] with every token outside the top-p nucleus set to -inf: in descending order,
    a token stays if the probability mass strictly before it is < top_p (so the first always
    stays).

    Only the head of the order is sorted: the `NUCLEUS_FIRST` largest logits (`topk`), then 4x as
    many, until their mass reaches top_p -- every token after them then has at least that much
    before it and goes -- and the whole vocabulary only for a distribution that flat. A full sort
    of every row cost 0.44 ms a step at 8,192 logits and 10.5 ms at V4's 129,280; a peaked row
    now 0.08 and 0.37 ms (`python benchmarks/bench_sampling.py`). The probabilities are the
    whole vocabulary's softmax, computed for the candidates only."""
    v = x.shape[-1]
    k = min(NUCLEUS_FIRST, v)
    top, index = torch.topk(x, k)  # descending
    # the softmax's own arithmetic, exp of differences to the max over their sum (exp(x - lse)
    # lost ~5e-6 of the mass to lse's rounding at logits ~150, and then kept every token), with
    # the sum and the running mass in float64 (the float32 softmax + cumsum of a full sort put the
    # cut of flat 129K-token rows 1-2 tokens off the float64 rule in 6 of 150 rows, this in 0)
    total = torch.exp(x - top[0]).sum(dtype=torch.float64)
    while True:
        probs = torch.exp(top - top[0]).double() / total
        before = torch.cumsum(probs, dim=-1) - probs
        if k == v or not float(before[-1] + probs[-1]) < top_p:  # (NaN mass: the whole row)
            break
        k = min(v, 4 * k)
        top, index = torch.topk(x, k)
    keep = before < top_p
    keep[0] = True  # (a top_p below float32's resolution must not drop every token)
    index = index[keep]
    return torch.full_like(x, float("-inf")).index_copy_(0, index, x.index_select(0, index))


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to weights [V] (nonnegative, any total).

    The exponential race torch.multinomial(weights, 1) runs -- argmax_i w_i / E_i with E_i ~
    Exp(1) independent, which wins with probability w_i / sum(w) -- with E = -log(U) from
    torch.rand: PyTorch's own exponential draws are its cost (2.4 of multinomial's 2.6 ms for
    V4's 129,280 weights, 154 of 176 us for 8,192; `python benchmarks/bench_sampling.py`).
    Every index gets its own random number, so logits that differ slightly between batch
    compositions rarely change the winner (a single uniform located in a running sum did: the
    sum's error reaches every later boundary). A zero weight never wins (0 / E = 0; U = 0 gives
    E = inf, not NaN). The same seed draws other tokens than multinomial did, from the same
    distribution."""
    w = weights.cpu()
    total = float(w.sum(dtype=torch.float64))
    if not total > 0 or total == float("inf"):  # (NaN fails the first test)
        raise ValueError(f"draw needs nonnegative finite weights with a positive sum, got a sum of {total}")
    e = torch.rand(w.shape, generator=generator, dtype=torch.float32).log_().neg_()
    return int(torch.argmax(w.float() / e))


class SamplingError(ValueError):
    """One row's logits cannot be sampled (NaN logits, or no token left with nonzero probability)."""


def check_logits(logits: torch.Tensor, top: float | None = None) -> None:
    """Raise SamplingError for logits [V] with a NaN or without a single finite value.

    `top`: their max, where the caller has it (the decode loop takes every row's max and argmax
    in one pass). One max decides: it is NaN when any logit is (max propagates NaN) and finite
    when a finite logit is the largest; only a +inf max needs a look for a finite value.
    (`python benchmarks/bench_sampling.py`, with the greedy pick: 8,192 logits 46 -> 13 us a step,
    a `small` step being ~4.5 ms; 8 rows of V4's 129,280 logits 2.75 -> 0.52 ms.)"""
    top = float(logits.max()) if top is None else top
    if math.isfinite(top):
        return
    if math.isnan(top) or top < 0 or not bool(torch.isfinite(logits).any()):
        raise SamplingError("the model produced non-finite logits (NaN, or no finite value) for this request")


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               logprobs_row: torch.Tensor | None = None, top: float | None = None):
    """Pick one token from logits [V] (`top`: their max, if known); returns (token, logprob or
    None, top list or None). Raises SamplingError when the row cannot be sampled; the caller
    ends that request alone."""
    if params.greedy:
        best, index = logits.max(dim=-1)  # (the first of equal maxima, as torch.argmax)
        check_logits(logits, float(best))
        token = int(index)
    else:
        check_logits(logits, top)
        x = filter_logits(logits, params.temperature, params.top_k, params.top_p)
        try:  # (draw refuses a NaN, infinite or zero total: the one check of the distribution)
            token = draw(torch.softmax(x, dim=-1), generator)
        except ValueError:
            raise SamplingError("the sampling distribution is not a probability distribution "
                                f"(temperature={params.temperature!r}, top_p={params.top_p!r}, top_k={params.top_k!r})"
                                ) from None
    return (token, *token_logprobs(logits, token, params, logprobs_row))


def token_logprobs(logits: torch.Tensor, token: int, params: SamplingParams, logprobs_row=None):
    """(logprob of `token`, [(id, logprob)] of the top alternatives) if the request asked for them."""
    if not params.logprobs:
        return None, None
    if params.logprobs_mode == "sampled" and params.greedy:
        lp = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        lp[token] = 0.0  # (a point mass on the argmax)
    elif params.logprobs_mode == "sampled" and (params.temperature != 1.0 or params.top_k or params.top_p < 1.0):
        lp = torch.log_softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    else:
        lp = logprobs_row if logprobs_row is not None else torch.log_softmax(logits.float(), dim=-1)
    top = None
    if params.top_logprobs:
        vals, ids = torch.topk(lp, params.top_logprobs)
        top = list(zip(ids.tolist(), vals.tolist()))
    return float(lp[token]), top
