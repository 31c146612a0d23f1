"""MTP speculative decoding gives exactly the greedy tokens of plain decoding."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine.generate import generate
from nanoseek.engine.speculative import speculative_generate


def model_with_predictable_mtp():
    """A random tiny model: its MTP drafts are mostly rejected, which exercises the rollback;
    the second test forces perfect drafts to exercise acceptance."""
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", index_topk=3)).eval()


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_equals_plain_greedy(num_draft):
    model = model_with_predictable_mtp()
    g = torch.Generator().manual_seed(1)
    for plen in (1, 7, 40):
        prompt = torch.randint(2, 1024, (plen,), generator=g).tolist()
        plain = generate(model, prompt, 30, stop_on_eos=False)
        spec, stats = speculative_generate(model, prompt, 30, num_draft=num_draft, stop_ids=())
        assert spec == plain
        assert stats.generated == 30 and stats.drafted > 0
        assert 0.0 <= stats.acceptance_rate <= 1.0


def test_accepted_drafts_keep_the_output_exact():
    """Force acceptance: make the MTP head predict what the main model predicts by sharing the
    decision (the MTP logits are replaced by the main model's own next-next prediction)."""
    model = model_with_predictable_mtp()
    prompt = list(range(5, 25))
    plain = generate(model, prompt, 24, stop_on_eos=False)
    oracle = prompt + plain  # the true greedy continuation

    real = model.mtp_forward

    def perfect_drafter(streams, next_ids, cache=None, depth=0):
        logits, h = real(streams, next_ids, cache=cache, depth=depth)
        # position of the token this call predicts: mtp position + 2
        pos = int(cache.mtp_pos[0][0]) + 1  # after the call, the last consumed mtp position + 1
        target = oracle[pos] if pos < len(oracle) else 0
        forced = torch.full_like(logits, -1e9)
        forced[..., -1, target] = 0.0
        return forced, h

    model.mtp_forward = perfect_drafter
    spec, stats = speculative_generate(model, prompt, 24, num_draft=3, stop_ids=())
    assert spec == plain
    assert stats.acceptance_rate > 0.9 and stats.tokens_per_call > 3
