"""MTP speculative decoding: the model's own MTP module drafts, the main model verifies.

V4 report 2.1 / DeepSeek-V3 2.2 (MTP as the drafter; vLLM's `{"method": "mtp", ...}`), with
speculative sampling for temperature > 0 (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling").

One round on one sequence at position P (the main model has consumed the tokens < P, `tok` is
the token at P, `last_h` the main model's final streams at P-1):
  1. draft: the MTP module at P-1 takes (last_h, tok) and predicts the token at P+1; applied
     recursively (its output streams replace H) it drafts d_1..d_k. Greedy drafts take the
     argmax; sampled drafts are drawn from q_i, the MTP's distribution after the *same*
     temperature / top-k / top-p processing as the request;
  2. verify: one main-model call on [tok, d_1..d_k] gives the main model's distributions
     p_1..p_{k+1} at P+1..P+k+1.
     Greedy: the longest prefix of drafts equal to argmax p_i is accepted, plus argmax p_{a+1}.
     Sampled: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
     rejection one token is drawn from normalize(max(0, p_i - q_i)) and the round ends; if all
     k are accepted a bonus token is drawn from p_{k+1}. Each emitted token is then distributed
     exactly as plain sampling from p would give (the two papers' theorem), whatever q is;
  3. roll back: `model.rollback` undoes the rejected suffix of the main cache (exact); the MTP
     cache is rewound to P, and the accepted positions' pairs (true H_t, token t+1) are queued:
     the next round's first draft call feeds them together with its own input, so a round costs
     k MTP calls and one main-model call (the queue is how batch.py keeps the MTP cache exact
     across plain batched steps too).
So greedy output equals plain greedy decoding token for token, and sampled output has the plain
sampling distribution (tests/engine/test_speculative.py checks both); the MTP only changes speed.

The rounds run inside the continuous-batching runner (batch.py, `speculative_tokens=K`), which
calls `spec_round` on a lone decoding sequence and falls back to batched one-token steps when
several sequences decode (a multi-token model call needs all its rows at one position).
`speculative_generate` (generate.py, with the other drivers) is the batch-1 convenience wrapper:

    ids, stats = speculative_generate(model, prompt_ids, max_new_tokens=64, num_draft=2)
    ids, stats = speculative_generate(model, prompt_ids, 64, temperature=0.8, top_p=0.95, seed=1)
    stats.acceptance_rate, stats.tokens_per_call
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import SamplingParams, draw, filter_logits


@dataclass
class SpecStats:
    rounds: int = 0  # main-model calls (for speculative_generate: the prefill counts as one)
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Tokens emitted per main-model forward (1.0 for plain decoding)."""
        return self.generated / self.rounds if self.rounds else 0.0


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from: temperature, top-k, top-p, softmax (fp32)."""
    return torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)


def accept_sampled(main_logits: torch.Tensor, q_probs: list[torch.Tensor], drafts: list[int],
                   params: SamplingParams, generator: torch.Generator | None) -> tuple[int, list[int]]:
    """Speculative sampling. main_logits [k+1, V]: the main model's logits after each fed token;
    q_probs[i] [V]: the processed draft distribution d_i was drawn from. Returns (accepted count a,
    emitted tokens = d_1..d_a + one token drawn from the residual or, if a == k, from p_{k+1})."""
    k = len(drafts)
    for i, d in enumerate(drafts):
        p, q = sampling_probs(main_logits[i], params), q_probs[i]
        u = float(torch.rand((), generator=generator))
        if u * float(q[d]) < float(p[d]):  # accept with probability min(1, p(d) / q(d))
            continue
        residual = (p - q).clamp_min(0.0)
        if not float(residual.sum()) > 0:  # p == q up to rounding: rejection had ~0 probability
            residual = p
        return i, drafts[:i] + [draw(residual, generator)]
    p = sampling_probs(main_logits[k], params)
    return k, drafts + [draw(p, generator)]


Pending = list[tuple[torch.Tensor, list[int]]]  # MTP pairs not fed yet: (streams [1,m,n,d], m tokens)


@torch.no_grad()
def spec_round(model, cache, last_h: torch.Tensor, tok: int, k: int, params: SamplingParams,
               generator: torch.Generator | None, mask: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
               pending: Pending = ()):
    """One draft-verify-rollback round on a batch-1 cache (or a one-row view of a batch cache).

    Needs cache.pos == P, `last_h` [1,1,n,d] = the main model's streams at P-1, `tok` = the token
    at P, and cache.mtp_pos[0] + (pairs in `pending`) == P - 1. Returns (emitted tokens, accepted
    drafts a, the main logits [k+1, V] of the verification call on the CPU (masked), streams at
    the new P-1, the new pending pairs). Afterwards the cache holds tok, d_1..d_a (pos = P+a+1),
    the same invariant holds for the MTP, and the last emitted token is the next one to feed.
    `mask` post-processes logits [.., V] (e.g. forbids ids past the tokenizer's vocabulary)."""
    dev = last_h.device
    drafts: list[int] = []
    q_probs: list[torch.Tensor] = []
    # the first draft call also feeds the queued pairs (one multi-token call instead of two)
    h = torch.cat([p[0] for p in pending] + [last_h], dim=1)
    ids = [t for p in pending for t in p[1]] + [tok]
    mtp_after_first = int(cache.mtp_pos[0][0]) + len(ids)  # = P: positions < P hold true pairs
    for _ in range(k):  # 1. draft recursively with the MTP module
        d_logits, h = model.mtp_forward(h, torch.tensor([ids], device=dev), cache=cache)
        h = h[:, -1:]
        row = mask(d_logits[0, -1].float().cpu())
        if params.greedy:
            cur = int(torch.argmax(row))
        else:
            q = sampling_probs(row, params)
            cur = draw(q, generator)
            q_probs.append(q)
        drafts.append(cur)
        ids = [cur]
    # 2. verify every draft with one main-model call
    snap = cache.snapshot()
    v_logits, v_streams = model(torch.tensor([[tok] + drafts], device=dev), cache=cache, return_streams=True)
    main = mask(v_logits[0].float().cpu())
    if params.greedy:
        choice = torch.argmax(main, dim=-1).tolist()
        a = 0
        while a < k and drafts[a] == choice[a]:
            a += 1
        emitted = drafts[:a] + [choice[a]]
    else:
        a, emitted = accept_sampled(main, q_probs, drafts, params, generator)
    # 3. keep [tok, d_1..d_a] in the main cache; the MTP keeps positions < P (fed with true
    # streams), and MTP positions P..P+a-1 take (true H_t, d_{t-P+1}): queued for the next call
    model.rollback(cache, snap, keep=a + 1)
    cache.mtp_pos[0].fill_(mtp_after_first)
    new_pending = [(v_streams[:, :a], drafts[:a])] if a else []
    return emitted, a, main, v_streams[:, a : a + 1], new_pending
