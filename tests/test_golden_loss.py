"""Golden-loss regression: the tiny preset, seed 0, 10 optimizer steps (Muon + AdamW, clipping,
router-bias update, as train_step does) on a fixed learnable token stream; the losses are pinned.

A change to the model's maths, its initialisation, the loss terms or the optimizer moves these
numbers. If the change is intended, regenerate them and say why in the commit:

    .venv/bin/python -m tests.test_golden_loss      # prints the new GOLDEN list
"""

from __future__ import annotations

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train.optim import OptimConfig, build_optimizer

GOLDEN = [9.15257, 9.05537, 8.67306, 8.60049, 8.49000, 8.29556, 8.05787, 7.86191, 7.70528, 7.50814]
RTOL = 2e-3  # CPU kernels and thread counts reorder float sums; a real change moves far more


def golden_losses(steps: int = 10) -> list[float]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    g = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, model.config.vocab_size, (8, 16), generator=g)  # repeated: learnable
    opt = build_optimizer(model, OptimConfig(lr=2e-3))
    losses = []
    for _ in range(steps):
        ids = motifs[torch.randint(0, 8, (2, 4), generator=g)].reshape(2, 64)
        terms = model.loss(ids)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(1e-3)
        losses.append(terms.loss.item())
    return losses


def test_golden_losses():
    got = golden_losses()
    assert len(got) == len(GOLDEN) == 10
    bad = [(i, g, e) for i, (g, e) in enumerate(zip(got, GOLDEN)) if abs(g - e) > RTOL * abs(e)]
    assert not bad, "losses moved (step, got, golden): " + ", ".join(f"({i}, {g:.5f}, {e:.5f})" for i, g, e in bad)
    assert got[-1] < got[0] - 0.5  # and it still learns


if __name__ == "__main__":
    print("GOLDEN = [" + ", ".join(f"{x:.5f}" for x in golden_losses()) + "]")
