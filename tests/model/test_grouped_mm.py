"""grouped_mm.mm_many (nanoseek/model/grouped_mm.py): groups of products as one MKL grouped GEMM,
against float64 products and the torch.mm loop it replaces."""

from __future__ import annotations

import pytest
import torch

from nanoseek.model import grouped_mm, moe


@pytest.fixture
def calls(monkeypatch):
    """How many grouped calls MKL received (the loop path makes none); the one-time self-test's
    call is made before counting."""
    grouped_mm._available()
    n = [0]
    real = grouped_mm._call

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(grouped_mm, "_call", counting)
    return n


def _groups(seed: int, rows=(0, 1, 17, 40, 64, 93)):
    """One expert-like group per layout: forward x W^T, the backward's G W and G^T X."""
    g = torch.Generator().manual_seed(seed)
    k, n = 96, 40
    xs = [torch.randn(m, k, generator=g) for m in rows]
    ws = [torch.randn(n, k, generator=g) for _ in rows]
    gys = [torch.randn(m, n, generator=g) for m in rows]
    return {
        "x W^T": [(x, w.t(), torch.full((x.shape[0], n), float("nan"))) for x, w in zip(xs, ws)],
        "G W": [(gy, w, torch.full((gy.shape[0], k), float("nan"))) for gy, w in zip(gys, ws)],
        "G^T X": [(gy.t(), x, torch.full((n, k), float("nan"))) for gy, x in zip(gys, xs)],
    }


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_products_match_float64(calls, threads):
    """Every layout the experts use, rows from 0 to 93 in one group (an empty product is
    skipped; a k = 0 one would take the loop), at fp32 rounding against float64; then
    accumulating into the outputs. Where PyTorch has MKL (its x86 builds) the group is one call."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, products in _groups(threads).items():
            grouped_mm.mm_many(products)
            for a, b, c in products:
                want = (a.double() @ b.double()).float()
                torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-4, msg=name)
            before = [c.clone() for _, _, c in products]
            grouped_mm.mm_many(products, accumulate=True)
            for (a, b, c), c0 in zip(products, before):
                torch.testing.assert_close(c, (c0.double() + a.double() @ b.double()).float(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(n)
    if torch.backends.mkl.is_available():
        assert grouped_mm._available() and calls[0] == 6   # three layouts, each once and accumulated


def test_what_does_not_qualify_takes_the_loop(calls, monkeypatch):
    """float64, a non-row-major output, decode-sized products (a few rows each), a single
    product, and the switch turned off: torch.mm one by one, with torch.mm's exact results."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 24, generator=g), torch.randn(30, 24, generator=g)
    cases = [
        [(a.double(), b.double().t(), torch.empty(40, 30, dtype=torch.float64))] * 2,
        [(a, b.t(), torch.empty(30, 40).t()), (a, b.t(), torch.empty(40, 30))],   # out not row-major
        [(a[:2], b.t(), torch.empty(2, 30)), (a[2:4], b.t(), torch.empty(2, 30))],  # 2 rows each
        [(a, b.t(), torch.empty(40, 30))],
    ]
    for products in cases:
        grouped_mm.mm_many(products)
        assert all(torch.equal(c, torch.mm(x, y)) for x, y, c in products)
    assert calls[0] == 0
    monkeypatch.setattr(grouped_mm, "enabled", False)
    products = [(a, b.t(), torch.empty(40, 30)), (a[:20], b.t(), torch.empty(20, 30))]
    grouped_mm.mm_many(products)
    assert calls[0] == 0 and all(torch.equal(c, torch.mm(x, y)) for x, y, c in products)


def test_a_batch_call_that_computes_wrongly_turns_the_path_off():
    """The one-time self-test: a symbol that does not compute the products (another integer
    width, another ABI) is refused; the real one passes where it exists."""
    assert not grouped_mm._self_test(lambda *args: None)
    if torch.backends.mkl.is_available():
        assert grouped_mm._self_test(grouped_mm._find())


def test_routed_experts_prefill_equals_the_per_expert_loop():
    """A prefill-sized routed-expert pass (16 experts, 512 tokens x top-2: ~64 rows each) through
    the grouped Function without gradients equals the plain per-expert loop at fp32 rounding."""
    torch.manual_seed(0)
    ex = moe.Experts(16, 128, 64, 7.0)
    with torch.no_grad():
        for w in (ex.w1, ex.w2, ex.w3):
            w.normal_(0, 0.1)
        x = torch.randn(512, 128)
        idx = torch.stack([torch.randint(0, 16, (512,)), torch.randint(0, 16, (512,))], 1)
        w = torch.rand(512, 2)
        fused = ex.grouped(x, idx, w)
        moe.Experts.fused = False
        try:
            plain = ex.grouped(x, idx, w)
        finally:
            moe.Experts.fused = True
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
