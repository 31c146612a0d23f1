"""Muon (V4 variant), parameter grouping and LR schedules (nanoseek/train/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train.optim import (
    CombinedOptimizer, Muon, OptimConfig, build_optimizer, decay_start, group_parameters, lr_schedule,
    newton_schulz,
)


def _polar(g: torch.Tensor) -> torch.Tensor:
    """Independent oracle: U V^T from the SVD."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).float()


@pytest.mark.parametrize("shape", [(48, 24), (24, 80), (32, 32)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g)
    s = torch.linalg.svdvals(o.double())
    assert s.min() > 0.98 and s.max() < 1.02          # hybrid 8+2 schedule: singular values ~ 1
    assert torch.allclose(o, _polar(g), atol=3e-2)    # and it is the polar factor, not just any isometry


def test_newton_schulz_batches_over_experts():
    g = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(2))
    o = newton_schulz(g)
    for e in range(3):
        assert torch.allclose(o[e], newton_schulz(g[e]), atol=1e-5)


def test_muon_first_step_is_scaled_orthogonal_update():
    n, m, lr = 40, 24, 0.01
    w0 = torch.randn(n, m, generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(w0.clone())
    p.grad = torch.randn(n, m, generator=torch.Generator().manual_seed(4))
    Muon([p], lr=lr, weight_decay=0.0).step()
    delta = (w0 - p.detach()) / lr
    # documented scale: O * sqrt(max(n, m)) * 0.18  => update RMS = 0.18 (the AdamW-matching RMS)
    rms = delta.pow(2).mean().sqrt().item()
    assert abs(rms - 0.18) < 0.18 * 0.02
    # direction: the orthogonal polar factor of (1 + mu) G, i.e. of G
    assert torch.allclose(delta / (0.18 * math.sqrt(max(n, m))), _polar(p.grad), atol=3e-2)


def test_muon_nesterov_momentum_and_weight_decay():
    torch.manual_seed(0)
    w0 = torch.randn(20, 30)
    g1, g2 = torch.randn(20, 30), torch.randn(20, 30)
    lr, wd, mu = 0.02, 0.1, 0.95
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=lr, weight_decay=wd, momentum=mu)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    # oracle, written from spec 3: M_t = mu M + G ; O = NS(mu M_t + G) ; W = W(1 - lr wd) - lr O s
    s = math.sqrt(30) * 0.18
    w = w0.clone()
    m1 = g1
    w = w * (1 - lr * wd) - lr * s * newton_schulz(mu * m1 + g1)
    m2 = mu * m1 + g2
    w = w * (1 - lr * wd) - lr * s * newton_schulz(mu * m2 + g2)
    assert torch.allclose(p.detach(), w, atol=1e-5)


def test_muon_stacked_experts_are_separate_matrices():
    """A stacked [E, n, m] parameter gets exactly the updates of E separate matrices."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 12, 20, generator=g)
    grad = torch.randn(4, 12, 20, generator=g)
    grad[2] *= 100.0                       # one expert with a much larger gradient
    stacked = torch.nn.Parameter(w.clone())
    stacked.grad = grad.clone()
    Muon([stacked], lr=0.01).step()
    for e in range(4):
        single = torch.nn.Parameter(w[e].clone())
        single.grad = grad[e].clone()
        Muon([single], lr=0.01).step()
        assert torch.allclose(stacked.detach()[e], single.detach(), atol=1e-6)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="Muon takes"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_grouping_rules_and_partition():
    model = Transformer(ModelConfig.from_preset("tiny"))
    groups = group_parameters(model)
    names = {g: {n for n, _ in items} for g, items in groups.items()}
    all_names = [n for n, _ in model.named_parameters()]
    # a partition: every parameter in exactly one group
    assert sorted(n for s in names.values() for n in s) == sorted(all_names)
    assert {"embed.weight", "head.weight"} <= names["adamw_matrix"]
    assert any(n.endswith("compressor.ape") for n in names["adamw_matrix"])
    for n in all_names:
        if n.endswith("norm.weight") or n.endswith(".base") or n.endswith(".scale") or n.endswith("attn_sink"):
            assert n in names["adamw_vector"], n
        if ".experts.w" in n or n.endswith("gate.weight") or n.endswith(".fn") or n.endswith("wq_a.weight"):
            assert n in names["muon"], n
    assert all(p.ndim in (2, 3) for _, p in groups["muon"])
    # build_optimizer hands each parameter to exactly one optimizer group
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, CombinedOptimizer)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(all_names)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["adamw_vector"]["weight_decay"] == 0.0 and by_name["adamw_matrix"]["weight_decay"] == 0.1


def test_schedule_shapes():
    kw = dict(warmup_steps=10, decay_frac=0.2)
    assert lr_schedule(0, 100, **kw) == pytest.approx(0.1)
    assert lr_schedule(9, 100, **kw) == pytest.approx(1.0)
    assert lr_schedule(50, 100, **kw) == 1.0                          # constant phase
    assert decay_start(100, 0.2) == 80
    assert lr_schedule(79, 100, **kw) == 1.0
    assert lr_schedule(99, 100, **kw) == pytest.approx(0.1)          # cosine to 10% of the peak
    mid = lr_schedule(89, 100, **kw)                                 # t = 0.5 of the decay
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_schedule(89, 100, shape="linear", **kw) == pytest.approx(1 - 0.9 * 0.5)
    vals = [lr_schedule(s, 100, **kw) for s in range(80, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
