"""MTP speculative decoding (greedy): the model's own MTP module drafts, the main model verifies.

V4 report 2.1 / DeepSeek-V3 2.2; vLLM's `{"method": "mtp", "num_speculative_tokens": k}`.

One round at position p (the main model has consumed tokens < p; `tok` is the token at p):
  1. draft: the MTP module at p-1 takes the main model's final streams H_{p-1} and `tok` and
     predicts the token at p+1; applied recursively (its output streams replace H) it drafts
     d_1..d_k;
  2. verify: one main-model call on [tok, d_1..d_k] gives the main model's own choice at
     p+1..p+k+1; the longest prefix of drafts that agrees is accepted, plus one token from the
     main model (the correction, or a bonus token when every draft was accepted);
  3. roll back: `model.rollback` undoes the rejected suffix in the main cache (exact); the MTP
     cache is re-fed with the main model's true streams for the accepted positions.
Every emitted token is the main model's argmax given the accepted prefix, so the output equals
plain greedy decoding (tests/engine/test_speculative.py); the MTP only changes the speed.
Acceptance rate and tokens per main-model call are reported. Batch size 1 (multi-token
verification needs all rows at one position); greedy only.

    ids, stats = speculative_generate(model, prompt_ids, max_new_tokens=64, num_draft=2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpecStats:
    rounds: int = 0
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


@torch.no_grad()
def speculative_generate(model, prompt_ids, max_new_tokens: int, num_draft: int = 2,
                         stop_ids: tuple[int, ...] | None = None) -> tuple[list[int], SpecStats]:
    if not len(model.mtp):
        raise ValueError("this model has no MTP module to draft with")
    if num_draft < 1:
        raise ValueError("num_draft must be >= 1")
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if prompt.shape[1] < 1:
        raise ValueError("empty prompt")
    stop = set(stop_ids if stop_ids is not None else (model.config.eos_token_id,))
    was_training = model.training
    model.eval()
    p_len = prompt.shape[1]
    cache = model.new_cache(1, p_len + max_new_tokens + num_draft + 1, spec_tokens=num_draft, with_mtp=True)
    stats = SpecStats()
    try:
        logits, streams = model(prompt, cache=cache, return_streams=True)
        if p_len > 1:  # MTP positions 0..p-2 see (H_t, token t+1), as in training
            model.mtp_forward(streams[:, :-1], prompt[:, 1:], cache=cache)
        last_h = streams[:, -1:]  # H at the last consumed position
        tok = int(logits[0, -1].argmax())
        out = [tok]
        stats.rounds = 1  # the prefill produced the first token
        while len(out) < max_new_tokens and tok not in stop:
            k = min(num_draft, max_new_tokens - len(out))
            # 1. draft with the MTP module, recursively
            mtp_snapshot = int(cache.mtp_pos[0][0])
            drafts, h, cur = [], last_h, tok
            for _ in range(k):
                d_logits, h = model.mtp_forward(h, torch.tensor([[cur]]), cache=cache)
                cur = int(d_logits[0, -1].argmax())
                drafts.append(cur)
            # 2. verify all drafts in one main-model call
            snap = cache.snapshot()
            feed = torch.tensor([[tok] + drafts])
            v_logits, v_streams = model(feed, cache=cache, return_streams=True)
            choice = v_logits[0].argmax(-1).tolist()  # main model's token after each fed token
            a = 0
            while a < k and drafts[a] == choice[a]:
                a += 1
            emitted = drafts[:a] + [choice[a]]
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += a
            # 3. keep [tok, d_1..d_a] in the main cache; re-feed the MTP with the true streams
            model.rollback(cache, snap, keep=a + 1)
            # MTP positions p-1 .. p+a-1 take (H_t, token t+1) with the main model's true H; the
            # next round drafts from position p+a (H_{p+a} and the corrected token)
            cache.mtp_pos[0].fill_(mtp_snapshot)
            true_h = torch.cat([last_h, v_streams[:, :a]], dim=1)
            model.mtp_forward(true_h, torch.tensor([[tok] + drafts[:a]]), cache=cache)
            last_h = v_streams[:, a : a + 1]
            for t in emitted:
                if len(out) >= max_new_tokens:
                    break
                out.append(t)
                if t in stop:
                    break
            tok = out[-1]
        stats.generated = len(out)
        return out, stats
    finally:
        model.train(was_training)
