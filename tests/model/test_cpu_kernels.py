"""The C kernels of the eager CPU paths (nanoseek/model/cpu_kernels.py, kernels/) against
the PyTorch reference, and their build: cached per machine, rebuilt when the CPU differs, and a
missing or failing compiler leaves the PyTorch path running.

The references are hyper_connections.sinkhorn's op-by-op autograd formula and moe.swiglu's
PyTorch formula (float64 where exactness matters); torch.autograd.gradcheck checks each
kernel's backward on its own.
"""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model import cpu_kernels
from nanoseek.model import hyper_connections as hc
from nanoseek.model import moe, norm

from ..conftest import skip_unless_ci


@pytest.fixture
def kernels():
    """The kernels built (fails in CI, skips elsewhere without a C compiler); the switch
    restored whatever a test does."""
    if not cpu_kernels.available():
        skip_unless_ci("no C compiler: the CPU kernels cannot be built")
    yield
    cpu_kernels.enabled = True
    hc.HyperConnection.fused = True
    hc.HyperConnection.stream_kernels = True
    hc.HyperConnection.collapse_function = True


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty kernel cache and a forgotten library, put back afterwards."""
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield tmp_path
    cpu_kernels._library.cache_clear()


def _reference(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float):
    x = logits.detach().clone().requires_grad_()
    hc.HyperConnection.fused = False   # the op-by-op formula
    try:
        out = hc.sinkhorn(x, iters, eps)
    finally:
        hc.HyperConnection.fused = True
    (dx,) = torch.autograd.grad(out, x, grad)
    return out.detach(), dx


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("n,iters,tokens", [(4, 20, 37), (4, 1, 16), (2, 2, 5), (3, 7, 1), (4, 20, 0), (8, 3, 33)])
def test_sinkhorn_kernel_equals_reference(kernels, dtype, tol, n, iters, tokens):
    torch.manual_seed(n * 100 + iters)
    logits = (2 * torch.randn(tokens, n, n, dtype=dtype)).view(tokens, 1, n, n)
    grad = torch.randn_like(logits)
    ref, dref = _reference(logits, grad, iters, 1e-6)
    out = cpu_kernels.sinkhorn(logits, iters, 1e-6)
    dx = cpu_kernels.sinkhorn_backward(logits, grad, iters, 1e-6)
    assert out.shape == dx.shape == logits.shape and out.dtype == dx.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dref, rtol=10 * tol, atol=10 * tol)


def test_sinkhorn_kernel_gradcheck_float64(kernels):
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: hc._SinkhornKernel.apply(x, 5, 1e-6), (logits,))
    small = torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: hc._SinkhornKernel.apply(x, 20, 1e-6), (small,))


def test_extreme_logits_match_the_reference(kernels):
    """Large, tiny, -inf and NaN logits: the kernel's exp (its own polynomial) behaves like
    torch's softmax; a NaN spoils only its own token."""
    logits = torch.randn(6, 4, 4)
    logits[0] *= 100            # exp arguments down to about -1000: underflow to ~0
    logits[1] *= 1e-6
    logits[2, 1, 3] = float("-inf")
    logits[3, 0, 0] = 80.0      # near the float exp range
    logits[4, 2, 1] = float("nan")
    out = cpu_kernels.sinkhorn(logits, 20, 1e-6)
    ref, _ = _reference(logits, torch.ones_like(logits), 20, 1e-6)
    assert torch.isnan(out[4]).any() and torch.isnan(ref[4]).any()
    keep = [0, 1, 2, 3, 5]
    torch.testing.assert_close(out[keep], ref[keep], rtol=2e-6, atol=2e-6)


def test_the_model_uses_the_kernel_where_it_applies(kernels, monkeypatch):
    calls = []
    real = cpu_kernels._call
    monkeypatch.setattr(cpu_kernels, "_call", lambda *a: calls.append(a[1] is None) or real(*a))
    x = torch.randn(5, 4, 4, requires_grad=True)
    out = hc.mix_weights(torch.randn(5, 24, requires_grad=True), torch.ones(3), torch.zeros(24), 4, 20, 1e-6)[2]
    out.sum().backward()
    assert calls == [True, False]                  # the training forward, then its backward
    with torch.no_grad():
        hc.sinkhorn(x, 20, 1e-6)
    assert calls[-1] is True                       # inference
    n_calls = len(calls)
    # bf16, n > 8, more than 64 iterations, a non-square matrix: the PyTorch path
    for logits, iters in [(x.bfloat16(), 20), (torch.randn(2, 9, 9), 20), (x, 65), (torch.randn(2, 4, 3), 20)]:
        assert not cpu_kernels.sinkhorn_applies(logits, iters)
    with torch.no_grad():
        hc.sinkhorn(torch.randn(2, 9, 9), 20, 1e-6)
    cpu_kernels.enabled = False
    assert not cpu_kernels.sinkhorn_applies(x, 20)
    with torch.no_grad():
        hc.sinkhorn(x, 20, 1e-6)
    hc.HyperConnection.fused = False              # the plain reference never takes the kernel
    cpu_kernels.enabled = True
    with torch.no_grad():
        hc.sinkhorn(x, 20, 1e-6)
    assert len(calls) == n_calls


def test_model_loss_and_gradients_with_and_without_the_kernel(kernels):
    """The whole model in float64, where summation-order differences stay near 1e-16: in fp32
    some gradients (mHC scales, ~1e-7 from cancelling terms) move by a relative 1e-3 with any
    change of order, which would measure the order, not the kernels."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    results = []
    for on in (False, True):
        cpu_kernels.enabled = on
        model.zero_grad(set_to_none=True)
        terms = model.loss(ids)
        terms.loss.backward()
        with torch.no_grad():
            logits = model(ids)
        results.append((terms.loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}))
    (loss0, logits0, g0), (loss1, logits1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits1, logits0, rtol=1e-10, atol=1e-11)
    assert g0.keys() == g1.keys()
    for name in g0:
        scale = g0[name].abs().max().clamp_min(1e-30)
        assert (g1[name] - g0[name]).abs().max() / scale < 1e-8, name


def test_build_is_cached_and_keyed_by_cpu(kernels, fresh_build, monkeypatch):
    builds = []
    run = subprocess.run

    def counting_run(cmd, *a, **kw):
        if "-shared" in cmd:
            builds.append(cmd)
        return run(cmd, *a, **kw)

    monkeypatch.setattr(cpu_kernels.subprocess, "run", counting_run)
    assert cpu_kernels.available() and len(builds) == 1
    libs = list(fresh_build.glob("kernels/*/nanoseek_kernels.so"))
    assert len(libs) == 1 and not list(fresh_build.glob("kernels/*/*.tmp*"))
    cpu_kernels._library.cache_clear()
    assert cpu_kernels.available() and len(builds) == 1          # a new process: loaded, not rebuilt
    cpu_kernels._library.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : another cpu")
    assert cpu_kernels.available() and len(builds) == 2          # another CPU: its own build
    assert len(list(fresh_build.glob("kernels/*/nanoseek_kernels.so"))) == 2


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_the_pytorch_path_runs(fresh_build, monkeypatch, caplog, cc):
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.INFO, logger="nanoseek.model.cpu_kernels"):
        assert not cpu_kernels.available()
    assert "PyTorch path" in caplog.text
    x = torch.randn(3, 4, 4, requires_grad=True)
    assert not cpu_kernels.sinkhorn_applies(x, 20)
    out = hc.mix_weights(torch.randn(3, 24, requires_grad=True), torch.ones(3), torch.zeros(24), 4, 20, 1e-6)[2]
    out.sum().backward()                                          # the torch Function
    torch.testing.assert_close(out.sum(-2), torch.ones(3, 4), rtol=1e-4, atol=1e-4)   # columns sum to 1
    assert not list(fresh_build.glob("kernels/*/nanoseek_kernels.so"))


def test_direct_calls_check_what_the_c_code_reads(kernels):
    """Called without *_applies, a mismatched shape, dtype or device is an error before any C
    code runs (it would read out of bounds), and switched-off kernels say so."""
    x = torch.randn(3, 4, 4)
    bad = [lambda: cpu_kernels.sinkhorn_backward(x, torch.randn(2, 4, 4), 20, 1e-6),
           lambda: cpu_kernels.sinkhorn(torch.randn(3, 4, 5), 20, 1e-6),
           lambda: cpu_kernels.sinkhorn(x, 0, 1e-6),
           lambda: cpu_kernels.sinkhorn(x.bfloat16(), 20, 1e-6),
           lambda: cpu_kernels.swiglu(torch.randn(4, 8), torch.randn(4, 1), 10.0),
           lambda: cpu_kernels.swiglu(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), 10.0),
           lambda: cpu_kernels.swiglu_backward(torch.randn(4, 8), torch.randn(4, 8), torch.randn(8), 10.0),
           lambda: cpu_kernels.cross_entropy_rows(torch.randn(4, 8).half(), torch.zeros(4, dtype=torch.long),
                                                  torch.ones(4)),
           lambda: cpu_kernels.cross_entropy_rows(torch.randn(8, 4).t(), torch.zeros(4, dtype=torch.long),
                                                  torch.ones(4)),
           lambda: cpu_kernels.cross_entropy_rows(torch.randn(4, 8), torch.zeros(3, dtype=torch.long), torch.ones(4)),
           lambda: cpu_kernels.cross_entropy_rows(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.ones(5))]
    for call in bad:
        with pytest.raises(ValueError):
            call()
    for labels in (torch.tensor([0, 1, 8, 2]), torch.tensor([0, -1, 3, 2])):   # each row is indexed by its label
        with pytest.raises(IndexError, match=r"in \[0, 8\)"):
            cpu_kernels.cross_entropy_rows(torch.randn(4, 8), labels, torch.ones(4))
    cpu_kernels.enabled = False
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.sinkhorn(x, 20, 1e-6)


def test_cc_may_name_a_wrapper(kernels, fresh_build, monkeypatch):
    """$CC as users set it for ccache ("ccache gcc"): a command line, not one path."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CC", f"env {cpu_kernels._compiler()[0]}")
    assert cpu_kernels.available()
    assert list(fresh_build.glob("kernels/*/nanoseek_kernels.so"))


def _swiglu_reference(gate, up, grad, limit):
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    cpu_kernels.enabled = False
    try:
        y = moe.swiglu(g, u, limit)
    finally:
        cpu_kernels.enabled = True
    dg, du = torch.autograd.grad(y, (g, u), grad)
    return y.detach(), dg, du


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_swiglu_kernel_equals_reference(kernels, dtype, tol, limit):
    """Values, both gradients and where NaN appears; inputs on and past the clamp bounds (the
    bound itself passes the gradient, as torch.clamp's does), far negative gates, NaN."""
    torch.manual_seed(1)
    gate, up = 4 * torch.randn(37, 21, dtype=dtype), 4 * torch.randn(37, 21, dtype=dtype)
    gate[0, :6] = torch.tensor([10.0, 10.5, -100.0, float("nan"), -10.0, 1.0])
    up[0, :6] = torch.tensor([-10.0, 10.0, 11.0, 1.0, -10.5, float("nan")])
    grad = torch.randn_like(gate)
    y_ref, dg_ref, du_ref = _swiglu_reference(gate, up, grad, limit)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = moe.swiglu(g, u, limit)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_SwiGLUBackward"
    dg, du = torch.autograd.grad(y, (g, u), grad)
    for out, ref in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)
    with torch.no_grad():                                          # inference: the same values
        torch.testing.assert_close(moe.swiglu(gate, up, limit), y_ref, rtol=tol, atol=tol, equal_nan=True)


def test_swiglu_kernel_gradcheck_float64(kernels):
    torch.manual_seed(0)
    gate = (3 * torch.randn(6, 7, dtype=torch.float64)).requires_grad_()
    up = (3 * torch.randn(6, 7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda g, u: moe._SwiGLU.apply(g, u, 5.0), (gate, up))
    assert torch.autograd.gradcheck(lambda g, u: moe._SwiGLU.apply(g, u, 0.0), (gate, up))


def test_experts_use_the_swiglu_kernel_in_fp32_and_bf16(kernels, monkeypatch):
    calls = []
    real = cpu_kernels.swiglu
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    model.loss(ids).loss.backward()
    assert calls and set(calls) == {torch.float32}                 # routed and shared experts
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):              # autocast: bf16 activations
        model.loss(ids).loss.backward()
    assert calls and set(calls) == {torch.bfloat16}
    monkeypatch.setattr(cpu_kernels, "swiglu_bf16", False)         # the benchmark switch: PyTorch's bf16 ops
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(ids).loss.backward()
    assert calls == []
    assert not cpu_kernels.swiglu_applies(torch.randn(2, 3).half(), torch.randn(2, 3).half())


def test_bf16_swiglu_rounds_once_to_nearest_even(kernels):
    """bf16 in, fp32 arithmetic, one rounding out: with silu(88) == 88 exactly in fp32, the
    kernel's y = 88 u must be PyTorch's own fp32 product rounded to bf16, bit for bit (the products
    of 88 and a bf16 need 12 bits: ties and both rounding directions occur); NaN stays NaN."""
    torch.manual_seed(7)
    up = torch.randn(4096).bfloat16()
    gate = torch.full_like(up, 88.0)
    gate[0] = float("nan")
    y = cpu_kernels.swiglu(gate, up, 0.0)
    expect = (88.0 * up.float()).bfloat16()
    assert torch.isnan(y[0])
    assert torch.equal(y[1:].view(torch.int16), expect[1:].view(torch.int16))


@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_bf16_swiglu_kernel_against_fp32_formula(kernels, limit):
    """Values and gradients for bf16 tensors against the fp32 formula on the same (bf16) inputs,
    rounded once: within one bf16 rounding (plus the fp32 exp's ulp); against PyTorch's bf16 ops,
    which round after every op, within two."""
    torch.manual_seed(8)
    gate, up, grad = (4 * torch.randn(53, 37)).bfloat16(), (4 * torch.randn(53, 37)).bfloat16(), torch.randn(53, 37).bfloat16()
    gate[0, :3] = torch.tensor([10.0, 12.0, -10.0])
    up[0, :3] = torch.tensor([-10.0, 10.0, 11.0])
    y_ref, dg_ref, du_ref = _swiglu_reference(gate.float(), up.float(), grad.float(), limit)
    y = cpu_kernels.swiglu(gate, up, limit)
    dg, du = cpu_kernels.swiglu_backward(gate, up, grad, limit)
    assert y.dtype == dg.dtype == du.dtype == torch.bfloat16
    for out, ref in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-6)
    y_bf16, dg_bf16, du_bf16 = _swiglu_reference(gate, up, grad, limit)   # PyTorch's bf16 ops
    for out, ref in ((y, y_bf16), (dg, dg_bf16), (du, du_bf16)):
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-2)


def test_an_unusable_cache_directory_leaves_the_pytorch_path_running(kernels, tmp_path, monkeypatch, caplog):
    """$NANOSEEK_CACHE naming a file (no directory can be made there, root or not): logged, and
    the model still runs, on PyTorch ops."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("NANOSEEK_CACHE", str(blocker))
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nanoseek.model.cpu_kernels"):
            assert not cpu_kernels.available()
        assert "PyTorch path" in caplog.text
        with torch.no_grad():
            comb = hc.sinkhorn(torch.randn(3, 4, 4), 20, 1e-6)
        torch.testing.assert_close(comb.sum(-2), torch.ones(3, 4), rtol=1e-4, atol=1e-4)
    finally:
        cpu_kernels._library.cache_clear()


def _mhc_inputs(lead, n, d, dtype):
    y, x = torch.randn(*lead, d, dtype=dtype), torch.randn(*lead, n, d, dtype=dtype)
    post, comb = 2 * torch.rand(*lead, n, dtype=dtype), torch.rand(*lead, n, n, dtype=dtype)
    w = torch.rand(*lead, n, dtype=dtype)
    return y, x, post, comb, w


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("lead,n,d", [((2, 37), 4, 512), ((5,), 4, 33), ((3, 1), 3, 7), ((1,), 1, 16), ((0,), 4, 8)])
def test_mhc_kernels_equal_the_pytorch_formulas(kernels, dtype, tol, lead, n, d):
    """The expand (stream mix) and the weighted sum, values and every gradient, against the
    plain formulas through autograd; d past, at and below the kernels' 16 lanes (tails)."""
    torch.manual_seed(2)
    y, x, post, comb, w = _mhc_inputs(lead, n, d, dtype)
    g, gs = torch.randn_like(x), torch.randn_like(y)
    leaves = [t.clone().requires_grad_() for t in (y, x, post, comb, w)]
    ry, rx, rpost, rcomb, rw = leaves
    ref_mix = torch.einsum("...jk,...jd->...kd", rcomb, rx) + rpost.unsqueeze(-1) * ry.unsqueeze(-2)
    ref_sum = (rw.unsqueeze(-1) * rx).sum(-2)
    ref_grads = torch.autograd.grad(ref_mix, (ry, rx, rpost, rcomb), g)
    ref_ws_grads = torch.autograd.grad(ref_sum, (rw, rx), gs)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, d ** 0.5))  # noqa: E731
    close(cpu_kernels.stream_mix(y, x, post, comb), ref_mix.detach())
    for got, ref in zip(cpu_kernels.stream_mix_backward(y, x, post, comb, g), ref_grads):
        close(got, ref)
    close(cpu_kernels.weighted_sum(w, x), ref_sum.detach())
    for got, ref in zip(cpu_kernels.weighted_sum_backward(w, x, gs), ref_ws_grads):
        close(got, ref)
    # gradients nobody asked for are not computed (None), the others unchanged
    part = cpu_kernels.stream_mix_backward(y, x, post, comb, g, (False, True, False, True))
    assert part[0] is None and part[2] is None
    close(part[1], ref_grads[1])
    assert cpu_kernels.weighted_sum_backward(w, x, gs, (True, False))[1] is None


def test_mhc_functions_take_the_kernels_and_pass_gradcheck(kernels, monkeypatch):
    calls = []
    for name in ("stream_mix", "stream_mix_backward", "weighted_sum", "weighted_sum_backward"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    torch.manual_seed(0)
    y, x, post, comb, w = (t.requires_grad_() for t in _mhc_inputs((3, 5), 4, 7, torch.float64))
    assert torch.autograd.gradcheck(hc._StreamMix.apply, (y, x, post, comb))
    assert torch.autograd.gradcheck(hc._WeightedSum.apply, (w, x))
    assert {"stream_mix", "stream_mix_backward", "weighted_sum", "weighted_sum_backward"} <= set(calls)


def test_kernels_give_the_same_bits_at_any_thread_count(kernels):
    """Tokens (elements, Sinkhorn's blocks) are split across OpenMP threads, each computed whole
    by one thread: the result cannot depend on the split. Sizes past the kernels' thresholds for
    going parallel (kernels.c), with tails."""
    torch.manual_seed(3)
    y, x, post, comb, w = _mhc_inputs((2, 301), 4, 96, torch.float32)
    g = torch.randn_like(x)
    logits, lg = torch.randn(1003, 4, 4), torch.randn(1003, 4, 4)
    gate, up = torch.randn(397, 211), torch.randn(397, 211)
    head, labels = torch.randn(37, 1001), torch.randint(0, 1001, (37,))
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            ce_grad = head.clone()
            outs.append((cpu_kernels.stream_mix(y, x, post, comb), *cpu_kernels.stream_mix_backward(y, x, post, comb, g),
                         cpu_kernels.weighted_sum(w, x), cpu_kernels.sinkhorn(logits, 20, 1e-6),
                         cpu_kernels.sinkhorn_backward(logits, lg, 20, 1e-6), cpu_kernels.swiglu(gate, up, 10.0),
                         *cpu_kernels.swiglu_backward(gate, up, gate, 10.0),
                         *cpu_kernels.cross_entropy_rows(ce_grad, labels, torch.ones(37)), ce_grad))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_the_model_uses_the_mhc_kernels_where_they_apply(kernels, monkeypatch):
    """Training (forward and backward) and inference (prefill) go through the kernels; fp16
    streams, the plain reference and switched-off kernels do not."""
    calls = []
    for name in ("stream_mix", "stream_mix_backward", "weighted_sum", "weighted_sum_backward"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    model.loss(ids).loss.backward()
    assert {"stream_mix", "stream_mix_backward", "weighted_sum", "weighted_sum_backward"} == set(calls)
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert {"stream_mix", "weighted_sum"} == set(calls)
    calls.clear()
    x = torch.randn(2, 4, 8)
    assert cpu_kernels.mhc_applies(x.bfloat16(), torch.randn(2, 4))   # bf16 streams, fp32 weights
    assert not cpu_kernels.mhc_applies(x.half())
    assert not cpu_kernels.mhc_applies(x, torch.randn(2, 8, dtype=torch.float64))   # mixed dtypes
    _no_calls_with_switches_off(model, ids, calls, monkeypatch, (hc.HyperConnection, "fused"))


def _no_calls_with_switches_off(model, ids, calls, monkeypatch, switch):
    """With `switch` (object, attribute) off, and with all C kernels off, a no-grad forward and
    a training step record no kernel call."""
    for off in (switch, (cpu_kernels, "enabled")):
        monkeypatch.setattr(*off, False)
        with torch.no_grad():
            model(ids)
        model.loss(ids).loss.backward()
        monkeypatch.setattr(*off, True)
    assert calls == []


def test_mhc_direct_calls_check_what_the_c_code_reads(kernels):
    y, x, post, comb, w = _mhc_inputs((3,), 4, 8, torch.float32)
    bad = [lambda: cpu_kernels.stream_mix(y[:2], x, post, comb),
           lambda: cpu_kernels.stream_mix(y, x, post, comb[..., :3]),
           lambda: cpu_kernels.stream_mix(y, x, post.double(), comb),
           lambda: cpu_kernels.stream_mix(y.bfloat16(), x.bfloat16(), post.bfloat16(), comb.bfloat16()),
           lambda: cpu_kernels.stream_mix(y, x.bfloat16(), post, comb),   # y in the streams' dtype
           lambda: cpu_kernels.weighted_sum(w.bfloat16(), x.bfloat16()),  # weights in fp32
           lambda: cpu_kernels.stream_mix_backward(y, x, post, comb, torch.randn(3, 4, 7)),
           lambda: cpu_kernels.weighted_sum(w[:, :3], x),
           lambda: cpu_kernels.weighted_sum(w, torch.randn(8)),
           lambda: cpu_kernels.weighted_sum_backward(w, x, torch.randn(3, 9)),
           lambda: cpu_kernels.collapse_backward(w, x, torch.randn(3, 8), torch.randn(4)),
           lambda: cpu_kernels.collapse_backward(w, x, torch.randn(3, 8), torch.randn(3, 1))]
    for call in bad:
        with pytest.raises(ValueError):
            call()



def _mix_inputs(tokens, n, d, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)   # noqa: E731
    return (torch.rand(tokens, n, generator=g, dtype=dtype), r(tokens, n, d), r(tokens, d), r(tokens),
            r(tokens, m), r(m, n * d), r(tokens, n, d))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("tokens,n,d,m", [(2048, 4, 512, 24), (37, 4, 24, 24), (5, 4, 40, 4), (1, 2, 8, 8),
                                          (70, 3, 17, 15), (33, 4, 192, 24), (0, 4, 16, 24)])
def test_mix_kernels_equal_the_float64_products(kernels, dtype, tol, tokens, n, d, m):
    """mix_rms and collapse_mix_backward (kernels/mhc.h) against the products in float64: any
    token count (register blocks of 8 / 4 / 32 tokens with a tail), d not a multiple of the
    vector span, M from 4 (a hyper head) to 24 (a site), with and without the extra gradient,
    and each output on its own (`needs`)."""
    w, x, gy, coef, gr, fn, extra = _mix_inputs(tokens, n, d, m, dtype)
    flat, X, F = x.view(tokens, n * d), x.double().view(tokens, n * d), fn.double()

    def close(got, want):
        scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)

    raw, ss = cpu_kernels.mix_rms(flat, fn)
    close(raw, X @ F.t())
    close(ss, X.square().sum(-1))
    base = (w.double().unsqueeze(-1) * gy.double().unsqueeze(-2) + coef.double().view(-1, 1, 1) * x.double())
    base = base.view(tokens, n * d) + gr.double() @ F
    for e in (None, extra):
        gx, gfn = cpu_kernels.collapse_mix_backward(w, x, gy, coef, gr, fn, e)
        close(gx.view(tokens, n * d), base if e is None else base + e.double().view(tokens, n * d))
        close(gfn, gr.double().t() @ X)
    only_x = cpu_kernels.collapse_mix_backward(w, x, gy, coef, gr, fn, extra, needs=(True, False))
    only_fn = cpu_kernels.collapse_mix_backward(w, x, gy, coef, gr, fn, extra, needs=(False, True))
    assert only_x[1] is None and only_fn[0] is None
    assert torch.equal(only_x[0], gx) and torch.equal(only_fn[1], gfn)


@pytest.mark.parametrize("tokens,n,d,m", [(2048, 4, 512, 24), (37, 4, 72, 24), (5, 3, 17, 15), (9, 4, 64, 4),
                                          (0, 4, 16, 24)])
def test_mhc_kernels_on_bf16_streams_round_the_fp32_results_once(kernels, tokens, n, d, m):
    """bf16 streams (bf16 autocast's): every mHC stream kernel widens them, computes what its fp32
    version computes from the widened values, and rounds each streams-sized result to bf16 once,
    to nearest even: the same bits as the fp32 kernel's result rounded by PyTorch's `.bfloat16()`
    (vector stores and the scalar tails alike); the per-token results (the mix, its sums of
    squares, the weights' and fn's gradients) are fp32 and equal the fp32 kernel's. (The fp32
    kernels are checked against float64 products above.)"""
    g = torch.Generator().manual_seed(5)
    big = lambda *shape: (3 * torch.randn(*shape, generator=g)).bfloat16()   # noqa: E731
    x, y, gs, gu, extra = big(tokens, n, d), big(tokens, d), big(tokens, n, d), big(tokens, d), big(tokens, n, d)
    w, post, coef = torch.rand(tokens, n, generator=g), 2 * torch.rand(tokens, n, generator=g), torch.randn(tokens)
    comb, gm, fn = torch.rand(tokens, n, n, generator=g), torch.randn(tokens, m, generator=g), torch.randn(m, n * d)
    wide = lambda *ts: [t.float() for t in ts]   # noqa: E731

    def same(got, want):   # streams-sized results: bf16, PyTorch's rounding of fp32's; the others fp32, equal
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                streams_sized = a.shape in (x.shape, y.shape) and a.shape != w.shape
                assert a.dtype == (torch.bfloat16 if streams_sized else torch.float32)
                assert torch.equal(a, b.to(a.dtype))

    assert cpu_kernels.mhc_applies(x, y, post, comb) and cpu_kernels.mix_applies(x.view(tokens, n * d), fn)
    X, Y, GS, GU, E = wide(x, y, gs, gu, extra)
    same([cpu_kernels.stream_mix(y, x, post, comb)], [cpu_kernels.stream_mix(Y, X, post, comb)])
    same(cpu_kernels.stream_mix_backward(y, x, post, comb, gs), cpu_kernels.stream_mix_backward(Y, X, post, comb, GS))
    same([cpu_kernels.weighted_sum(w, x)], [cpu_kernels.weighted_sum(w, X)])
    same(cpu_kernels.weighted_sum_backward(w, x, gu), cpu_kernels.weighted_sum_backward(w, X, GU))
    same([cpu_kernels.collapse_backward(w, x, gu, coef)], [cpu_kernels.collapse_backward(w, X, GU, coef)])
    same(cpu_kernels.mix_rms(x.view(tokens, n * d), fn), cpu_kernels.mix_rms(X.view(tokens, n * d), fn))
    for e, ew in ((None, None), (extra, E)):
        same(cpu_kernels.collapse_mix_backward(w, x, gu, coef, gm, fn, e),
             cpu_kernels.collapse_mix_backward(w, X, GU, coef, gm, fn, ew))
    # NaN stays NaN through the bf16 stores (vector lanes and tails alike), inf stays inf
    if tokens:
        bad = x.clone()
        bad[0, 0, 0], bad[-1, -1, -1] = float("nan"), float("inf")
        out = cpu_kernels.stream_mix(y, bad, post, comb).float()
        ref = cpu_kernels.stream_mix(Y, bad.float(), post, comb)
        assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
        assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[ref.isinf()], ref[ref.isinf()])
        gx = cpu_kernels.collapse_mix_backward(w, bad, gu, coef, gm, fn, extra, (True, False))[0].float()
        gx_ref = cpu_kernels.collapse_mix_backward(w, bad.float(), GU, coef, gm, fn, E, (True, False))[0]
        assert torch.equal(gx.isnan(), gx_ref.isnan()) and gx.isnan().any()
    # the rounding is PyTorch's, not a truncation: some results change in their last bf16 bit
    if tokens:
        exact = cpu_kernels.stream_mix(Y, X, post, comb)
        assert not torch.equal(exact.bfloat16(), (exact.view(torch.int32) & -65536).view(torch.float32).bfloat16())


def test_mix_kernels_per_token_results_ignore_the_thread_count(kernels):
    """raw, ss and the streams' gradient are computed whole per token: the same bits at 1 and 3
    threads; fn's gradient adds per-thread partial sums (rounding only, as a GEMM's)."""
    w, x, gy, coef, gr, fn, extra = _mix_inputs(301, 4, 64, 24, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            results.append((*cpu_kernels.mix_rms(x.view(301, -1), fn),
                            *cpu_kernels.collapse_mix_backward(w, x, gy, coef, gr, fn, extra)))
    finally:
        torch.set_num_threads(threads)
    (raw1, ss1, gx1, gfn1), (raw3, ss3, gx3, gfn3) = results
    assert torch.equal(raw1, raw3) and torch.equal(ss1, ss3) and torch.equal(gx1, gx3)
    torch.testing.assert_close(gfn3, gfn1, rtol=1e-5, atol=1e-5)


def test_mix_direct_calls_check_what_the_c_code_reads(kernels):
    w, x, gy, coef, gr, fn, extra = _mix_inputs(3, 4, 8, 24, torch.float32)
    flat = x.view(3, 32)
    assert cpu_kernels.mix_applies(flat, fn) and not cpu_kernels.mix_applies(flat, torch.randn(65, 32))
    assert not cpu_kernels.mix_applies(flat, fn.double()) and not cpu_kernels.mix_applies(flat.half(), fn)
    assert cpu_kernels.mix_applies(flat.bfloat16(), fn) and not cpu_kernels.mix_applies(flat.bfloat16(), fn.bfloat16())
    bad = [lambda: cpu_kernels.mix_rms(flat, fn[:, :31]),
           lambda: cpu_kernels.mix_rms(flat.bfloat16(), fn.bfloat16()),        # fn in the arithmetic's fp32
           lambda: cpu_kernels.collapse_mix_backward(w, x.bfloat16(), gy, coef, gr, fn, extra.float()[:, :3]),
           lambda: cpu_kernels.mix_rms(flat, torch.randn(65, 32)),           # more outputs than a block holds
           lambda: cpu_kernels.mix_rms(flat, fn.double()),
           lambda: cpu_kernels.mix_rms(x, fn),
           lambda: cpu_kernels.collapse_mix_backward(w, x, gy, coef, gr[:, :23], fn),
           lambda: cpu_kernels.collapse_mix_backward(w, x, gy, coef[:2], gr, fn),
           lambda: cpu_kernels.collapse_mix_backward(w, x, gy, coef, gr, fn, extra[:, :3]),
           lambda: cpu_kernels.collapse_mix_backward(w, x, gy[:, :7], coef, gr, fn)]
    for call in bad:
        with pytest.raises(ValueError):
            call()

def test_one_openmp_runtime_in_the_process(kernels):
    """The kernels' OpenMP (-fopenmp) must be PyTorch's own libgomp, not a second runtime with
    its own thread pool competing for the cores (Linux: the loaded libraries are listed)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    except OSError:
        pytest.skip("no /proc/self/maps on this system")
    assert len(paths) <= 1, paths


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("used", ["all", "x only", "streams frozen"])
@pytest.mark.parametrize("mix_kernel", [True, False])
def test_collapse_function_equals_the_composed_functions(kernels, monkeypatch, head, used, mix_kernel):
    """_Collapse (one Function, one streams gradient) against _MixRMS -> mix weights ->
    _WeightedSum in float64: the block input, post, comb, the streams passed on to the expand
    (an alias output of _Collapse, whose gradient its backward adds) and the gradients of the
    streams, fn, scale and base; also with post / comb unused (their gradients None) and frozen
    streams; with the mix kernels (cpu_kernels.mix_rms, collapse_mix_backward) and without."""
    monkeypatch.setattr(hc.HyperConnection, "COLLAPSE_MIN_ELEMENTS", 0)   # (small test tensors)
    monkeypatch.setattr(hc.HyperConnection, "mix_kernels", mix_kernel)
    torch.manual_seed(4)
    n, d = 4, 24
    site = (hc.HyperHead(d, n, 1e-6, 1e-6) if head else hc.HyperConnection(d, n, 20, 1e-6, 1e-6)).double()
    with torch.no_grad():
        site.fn.normal_(0, 0.3)
        site.base.normal_(0, 0.5)
        site.scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, n, d, dtype=torch.float64, requires_grad=used != "streams frozen")
    results = []
    for fused_collapse in (False, True):
        hc.HyperConnection.stream_kernels = fused_collapse   # off: the composed Functions, PyTorch ops
        outs = site(x) if head else site.collapse(x)
        outs = (outs,) if head else outs
        assert (type(outs[0].grad_fn).__name__ == "_CollapseBackward") == fused_collapse
        gen = torch.Generator().manual_seed(6)               # the same loss weights in both runs
        weights = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
        terms = outs[:1] if used == "x only" else outs
        loss = sum((o * w).sum() for o, w in zip(terms, weights))
        params = [p for p in (x, site.fn, site.scale, site.base) if p.requires_grad]
        results.append(([o.detach() for o in outs], torch.autograd.grad(loss, params)))
    hc.HyperConnection.stream_kernels = True
    (outs0, grads0), (outs1, grads1) = results
    for a, b in zip(outs0 + list(grads0), outs1 + list(grads1)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_collapse_function_gradcheck_float64(kernels):
    torch.manual_seed(5)
    n, d = 4, 5
    site = hc.HyperConnection(d, n, 3, 1e-6, 1e-6).double()
    with torch.no_grad():
        site.fn.normal_(0, 0.5)
        site.base.normal_(0, 0.5)
    x = torch.randn(3, n, d, dtype=torch.float64, requires_grad=True)

    def collapse(x, fn, scale, base):
        return hc._Collapse.apply(x, fn, scale, base, lambda m, s, b: hc.mix_weights(m, s, b, n, 3, 1e-6), 1e-6)

    assert torch.autograd.gradcheck(collapse, (x, site.fn, site.scale, site.base))


def test_the_model_collapses_with_one_function_in_training_only(kernels, monkeypatch):
    """With fp32 streams of at least COLLAPSE_MIN_ELEMENTS, bf16 streams (autocast) of any size,
    in training only."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(
        type((out[0] if isinstance(out, tuple) else out).grad_fn).__name__)) for m in model.modules()
        if isinstance(m, hc.HyperHead)]
    model.loss(ids).loss.backward()
    assert seen and set(seen) == {"_WeightedSumBackward"}          # tiny streams: the composed Functions
    monkeypatch.setattr(hc.HyperConnection, "COLLAPSE_MIN_ELEMENTS", 1)
    seen.clear()
    model.loss(ids).loss.backward()
    assert seen and set(seen) == {"_CollapseBackward"}
    monkeypatch.setattr(hc.HyperConnection, "COLLAPSE_MIN_ELEMENTS", 1 << 40)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 streams: the Function whatever their size
        loss = model.loss(ids).loss
    loss.backward()
    assert seen and set(seen) == {"_CollapseBackward"}
    with torch.no_grad():
        model(ids)
    assert seen[-1] == "NoneType"                                  # inference: no Function at all
    hc.HyperConnection.collapse_function = False                   # the composed Functions
    model.loss(ids).loss.backward()
    assert seen[-1] == "_WeightedSumBackward"
    for h in hooks:
        h.remove()


def _ce_reference(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor):
    """(lse, target logit, (softmax - one-hot) * weight) in float64, from the logits as stored."""
    x = logits.double()
    onehot = torch.nn.functional.one_hot(labels, x.shape[1]).double()
    grad = (torch.softmax(x, -1) - onehot) * weight.double().unsqueeze(1)
    return torch.logsumexp(x, -1), x.gather(1, labels.unsqueeze(1)).squeeze(1), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(37, 1001), (1, 16), (5, 4099)])
def test_cross_entropy_kernel_equals_float64_formula(kernels, dtype, rows, vocab):
    """lse and the target logit to the arithmetic's rounding; the gradient (written over the
    logits) to that, then one rounding to the logits' dtype (bf16: half an ulp of 2^-8)."""
    torch.manual_seed(rows)
    logits = (torch.randn(rows, vocab, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    weight = (torch.rand(rows) > 0.3).float()
    ref_lse, ref_target, ref_grad = _ce_reference(logits, labels, weight)
    out = logits.clone()
    lse, target = cpu_kernels.cross_entropy_rows(out, labels, weight)
    assert lse.dtype == target.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    assert torch.equal(target.double(), ref_target)   # read, not computed
    grad_tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2.0**-9 + 1e-6}[dtype]   # fp32: ~8 ulp of 1
    assert (out.double() - ref_grad).abs().max() <= grad_tol * max(1.0, ref_grad.abs().max())
    assert not out[weight == 0].any()                 # ignored rows: zero gradient
    untouched = logits.clone()
    cpu_kernels.cross_entropy_rows(untouched, labels, weight, grad=False)
    assert torch.equal(untouched, logits)             # grad=False reads only


def test_cross_entropy_kernel_keeps_nan_in_its_row(kernels):
    """A NaN logit (a diverged step) makes that row's lse and gradient NaN, as F.cross_entropy's
    would be, and leaves the other rows alone."""
    logits = torch.randn(3, 40)
    logits[1, 7] = float("nan")
    labels = torch.tensor([0, 1, 2])
    lse, _ = cpu_kernels.cross_entropy_rows(logits, labels, torch.ones(3))
    assert torch.isnan(lse[1]) and torch.isnan(logits[1]).all()
    assert torch.isfinite(lse[[0, 2]]).all() and torch.isfinite(logits[[0, 2]]).all()


def _norm_reference(x: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor, eps: float = 1e-6):
    """(y, d x, d weight or None) of the plain RMSNorm formula in float64, from the tensors as stored."""
    xd = x.double().requires_grad_()
    wd = None if weight is None else weight.double().requires_grad_()
    y = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    y = y if wd is None else y * wd
    grads = torch.autograd.grad(y, [t for t in (xd, wd) if t is not None], grad.double())
    return y.detach(), grads[0], grads[1] if wd is not None else None


def _close(got: torch.Tensor, want: torch.Tensor, tol: float):
    """To tol relative to the largest entry (the kernel's sums run in another order)."""
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(2, 37, 512), (5, 77), (1, 16), (1, 3), (70, 33), (0, 8)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_kernel_equals_float64_formula(kernels, dtype, tol, shape, weighted):
    """y, r, grad_x and grad_w (kernels/norm.h) against the plain formula's autograd in float64:
    tokens across several of the weight gradient's blocks (NORM_BLOCK), a single token, no token,
    d not a multiple of the kernel's 16 lanes; each gradient on its own (`needs`)."""
    torch.manual_seed(shape[-1])
    x = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    w = torch.randn(shape[-1], dtype=dtype) if weighted else None
    g = torch.randn(*shape, dtype=dtype)
    ref_y, ref_gx, ref_gw = _norm_reference(x, w, g)
    y, r = cpu_kernels.rms_norm(x, w, 1e-6)
    gx, gw = cpu_kernels.rms_norm_backward(x, r, w, g)
    assert y.dtype == r.dtype == gx.dtype == dtype and y.shape == gx.shape == x.shape and r.shape == shape[:-1]
    _close(y, ref_y, tol)
    _close(r, torch.rsqrt(x.double().square().mean(-1) + 1e-6), tol)
    _close(gx, ref_gx, tol)
    assert (gw is None) == (w is None)
    if w is not None:
        _close(gw, ref_gw, 10 * tol)
        only_x = cpu_kernels.rms_norm_backward(x, r, w, g, needs=(True, False))
        only_w = cpu_kernels.rms_norm_backward(x, r, w, g, needs=(False, True))
        assert only_x[1] is None and only_w[0] is None
        assert torch.equal(only_x[0], gx) and torch.equal(only_w[1], gw)


@pytest.mark.parametrize("weighted", [True, False])
def test_bf16_rms_norm_is_the_fp32_formula_rounded_once(kernels, weighted):
    """bf16 x: y is PyTorch's fp32 formula rounded once to bf16 (to one ulp, where the kernel's
    r differs from PyTorch's in its last bit), r in fp32; the gradients are the fp32 formula's
    (grad_x rounded to bf16, grad_w fp32)."""
    torch.manual_seed(5)
    x = (torch.randn(4, 37, 256) * 3).bfloat16()
    w = torch.randn(256) * 0.3 + 1 if weighted else None
    g = torch.randn(4, 37, 256).bfloat16()
    xf = x.float()
    r_ref = torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    ref = (xf * r_ref if w is None else xf * r_ref * w).bfloat16()
    y, r = cpu_kernels.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16 and r.dtype == torch.float32
    ulps = (y.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99
    torch.testing.assert_close(r, r_ref.squeeze(-1), rtol=1e-6, atol=0)
    _, ref_gx, ref_gw = _norm_reference(x, w, g)
    gx, gw = cpu_kernels.rms_norm_backward(x, r, w, g)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx.double(), ref_gx, rtol=2.0**-8, atol=1e-6)
    if weighted:
        assert gw.dtype == torch.float32
        _close(gw, ref_gw, 1e-5)


def test_rms_norm_kernel_gives_the_same_bits_at_any_thread_count(kernels):
    """Tokens are split across the threads, each computed whole by one; grad_w adds partial rows of
    fixed blocks of NORM_BLOCK tokens in order, so it does not depend on the split either."""
    torch.manual_seed(6)
    x, w, g = torch.randn(301, 96), torch.randn(96), torch.randn(301, 96)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            out = []
            for xs, gs in ((x, g), (x.bfloat16(), g.bfloat16())):
                y, r = cpu_kernels.rms_norm(xs, w, 1e-6)
                out += [y, r, *cpu_kernels.rms_norm_backward(xs, r, w, gs)]
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_rms_norm_kernel_keeps_nan_in_its_row(kernels):
    """A NaN activation (a diverged step) makes its row's y, r and grad_x NaN, as PyTorch's formula
    would, and leaves the other rows alone (grad_w sums every row: NaN there too, as in PyTorch)."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w, g = torch.randn(3, 40).to(dtype), torch.randn(40), torch.randn(3, 40).to(dtype)
        x[1, 7] = float("nan")
        y, r = cpu_kernels.rms_norm(x, w, 1e-6)
        gx, _ = cpu_kernels.rms_norm_backward(x, r, w, g)
        assert torch.isnan(y[1]).all() and torch.isnan(r[1]) and torch.isnan(gx[1]).all()
        assert torch.isfinite(y[[0, 2]]).all() and torch.isfinite(r[[0, 2]]).all() and torch.isfinite(gx[[0, 2]]).all()


def test_rms_norm_direct_calls_check_what_the_c_code_reads(kernels):
    x, w = torch.randn(3, 8), torch.randn(8)
    y, r = cpu_kernels.rms_norm(x, w, 1e-6)
    assert cpu_kernels.rms_norm_applies(x, w) and cpu_kernels.rms_norm_applies(x.bfloat16(), w)
    assert cpu_kernels.rms_norm_applies(x.double(), w.double()) and cpu_kernels.rms_norm_applies(x, None)
    for args in ((x, w.double()), (x.double(), w), (x.half(), None), (x, w[:7]), (x.bfloat16(), w.bfloat16()),
                 (torch.randn(3, 0), None)):
        assert not cpu_kernels.rms_norm_applies(*args)
    bad = [lambda: cpu_kernels.rms_norm(x, w[:7], 1e-6),
           lambda: cpu_kernels.rms_norm(x, w.double(), 1e-6),
           lambda: cpu_kernels.rms_norm(x.half(), None, 1e-6),
           lambda: cpu_kernels.rms_norm(x.bfloat16(), w.bfloat16(), 1e-6),
           lambda: cpu_kernels.rms_norm(torch.tensor(1.0), None, 1e-6),
           lambda: cpu_kernels.rms_norm(x, w.to("meta"), 1e-6),
           lambda: cpu_kernels.rms_norm_backward(x, r, w, torch.randn(3, 7)),
           lambda: cpu_kernels.rms_norm_backward(x, r[:2], w, x),
           lambda: cpu_kernels.rms_norm_backward(x, r.double(), w, x),
           lambda: cpu_kernels.rms_norm_backward(x, r, torch.randn(9), x)]
    for call in bad:
        with pytest.raises(ValueError):
            call()


def test_the_model_uses_the_norm_kernel_where_it_applies(kernels, monkeypatch):
    """Training (forward and backward; fp32, and bf16 autocast: fp32 and bf16 inputs) and
    inference go through the kernel; `RMSNorm.fused = False` and switched-off kernels do not."""
    calls = []
    for name in ("rms_norm", "rms_norm_backward"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _n=name, _r=real: calls.append((_n, a[0].dtype)) or _r(*a))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    model.loss(ids).loss.backward()
    assert {("rms_norm", torch.float32), ("rms_norm_backward", torch.float32)} == set(calls)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(ids).loss.backward()
    assert {(n, dt) for n in ("rms_norm", "rms_norm_backward") for dt in (torch.float32, torch.bfloat16)} == set(calls)
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert {("rms_norm", torch.float32)} == set(calls)
    calls.clear()
    _no_calls_with_switches_off(model, ids, calls, monkeypatch, (norm.RMSNorm, "fused"))
