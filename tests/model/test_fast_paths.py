"""The fast paths of the model against their plain references (issue: performance).

* attention: one fused scaled_dot_product_attention call (sink as an extra key channel) vs the
  op-by-op joint softmax (`Attention.use_sdpa = False`): outputs, every gradient (the sink's
  included), the indexer's KL target and recall;
* mHC: the hand-written autograd Functions (`HyperConnection.fused`) checked by
  torch.autograd.gradcheck in float64 and against the plain formulas;
* head + cross-entropy: `linear_cross_entropy` vs F.cross_entropy (values, gradients,
  ignore_index, autocast) and Transformer.loss with and without kept logits;
* RMSNorm: the autograd Function (`RMSNorm.fused`), with PyTorch ops or the C kernel, by
  gradcheck in float64 and against the plain formula (fp32, bf16 input, no weight); grad and
  no-grad forwards bit-identical;
* RoPE: the complex-product rotation (`rope.use_complex`) against the real-valued formula;
* routed experts in training: one autograd Function (`Experts.fused`, `_GroupedExperts`) against
  the per-expert F.linear loop (float64 exact, bf16 autocast, idle experts, gradcheck);
* decode head: `gemv.rows_linear` (oneDNN's matrix-vector product) vs F.linear, when it applies
  and when it must not (autograd, autocast), and a cached decode through it vs the full forward;
* compiled decode products: `gemv.linear` (and mHC's products) as multiply + sum inside a graph,
  which form each graph holds (dynamo's captured ops), and inductor's code against float64.
  (tests/model/test_compile.py and tests/engine/test_generate.py decode through them: compiled
  tokens and logits == eager.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.model import attention, cpu_kernels, gemv, moe, norm, rope
from nanoseek.model import hyper_connections as hc
from nanoseek.model.attention import Attention
from nanoseek.model.loss import linear_cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode

from .conftest import perturbed


def _tiny(**kw) -> ModelConfig:
    c = ModelConfig.from_preset("tiny")
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.fixture
def plain_paths():
    """Restore the class switches whatever a test does."""
    yield
    Attention.use_sdpa = True
    Attention.fold_heads = True
    hc.HyperConnection.fused = True
    norm.RMSNorm.fused = True
    rope.use_complex = True
    moe.Experts.fused = True


def _loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model.loss(ids, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_grads_close(a: dict, b: dict, rtol: float = 1e-4):
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        err = (a[name] - b[name]).abs().max() / scale
        assert err < rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_attention_equals_reference(plain_paths, packed):
    torch.manual_seed(0)
    model = Transformer(_tiny()).double()  # float64: the two paths agree to rounding
    with torch.no_grad():  # non-zero sinks, so the sink channel carries real mass
        for layer in model.layers:
            layer.attn.attn_sink.normal_(0, 1.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 150))
    kw = {}
    if packed:
        kw["doc_ids"] = torch.cat([torch.zeros(2, 40, dtype=torch.long), torch.ones(2, 110, dtype=torch.long)], 1)
    Attention.use_sdpa = False
    ref, g_ref = _loss_and_grads(model, ids, **kw)
    Attention.use_sdpa = True
    out, g_out = _loss_and_grads(model, ids, **kw)
    for term in ("loss", "ce", "mtp", "indexer", "indexer_recall"):
        # (the indexer's own KL runs in fp32 in every dtype: looser there)
        tol = 1e-6 if term.startswith("indexer") else 1e-12
        torch.testing.assert_close(getattr(out, term), getattr(ref, term), rtol=tol, atol=tol)
    assert any("attn_sink" in n for n in g_out)
    _assert_grads_close(g_ref, g_out, rtol=1e-9)


@pytest.mark.parametrize("cap", [Attention.FOLD_MASK_BYTES, 1])
def test_folded_heads_equal_per_head_float64(plain_paths, cap, monkeypatch):
    """The folded layout (one head of Bq*H query rows, mask rows repeated per head, in slices of
    blocks: cap 1 = one block per kernel call) gives the per-head layout's output and gradients
    (queries, window keys, compressed entries, sinks) to float64 rounding."""
    torch.manual_seed(0)
    attn = Transformer(_tiny()).double().layers[1].attn
    with torch.no_grad():
        attn.attn_sink.normal_(0, 1.0)
    monkeypatch.setattr(Attention, "FOLD_MASK_BYTES", cap)
    b, nb, bq, h, d, kw, n = 2, 3, 5, attn.h, attn.d, 7, 4
    s = nb * bq - 2                                                  # padded last block
    q = torch.randn(b, nb, bq * h, d, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(b, nb, d, kw, dtype=torch.float64, requires_grad=True)
    comp = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    win_bias = torch.zeros(b, nb, bq, kw, dtype=torch.float64).masked_fill(torch.rand(b, nb, bq, kw) < 0.3, float("-inf"))
    win_bias[..., 0] = 0                                             # every query sees a key
    comp_bias = torch.zeros(b, s, n, dtype=torch.float64).masked_fill(torch.rand(b, s, n) < 0.5, float("-inf"))
    grad = torch.randn(b, s, h, d, dtype=torch.float64)
    results = []
    for folded in (False, True):
        attn.zero_grad(set_to_none=True)
        out, lse = attn._sdpa(q, keys, win_bias, comp, comp_bias, s, folded)
        assert (lse is None) == (not folded)
        results.append([out, *torch.autograd.grad(out, (q, keys, comp, attn.attn_sink), grad)])
    for a, c in zip(*results):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    # the folded kernel's log-normaliser (the indexer's KL target reuses it) is the joint one
    # the op-by-op logits give: window, compressed entries and sink
    want = attn._logits(q.detach(), keys.detach(), win_bias, comp.detach(), comp_bias, s)[3]
    torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)


def test_folded_bf16_kernel_under_autocast(plain_paths, monkeypatch):
    """Under bf16 autocast on a CPU the prompt / training blocks go to the kernel folded and in
    bf16 (fp32 without autocast, per head for one-query decode blocks); loss and gradients stay
    as close to the fp32 model as the per-head fp32 kernel under autocast keeps them."""
    torch.manual_seed(0)
    model = Transformer(_tiny())
    ids = torch.randint(0, model.config.vocab_size, (2, 70))
    seen = []
    real, real_flash = F.scaled_dot_product_attention, attention._flash
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append((q.dtype, q.shape[1])) or real(q, *a, **k))
    monkeypatch.setattr(attention, "_flash", lambda q, *a: seen.append((q.dtype, q.shape[1])) or real_flash(q, *a))
    real_softmax = attention._sink_softmax     # (the folded bf16 blocks' batched-product path)
    monkeypatch.setattr(attention, "_sink_softmax", lambda p, *a: seen.append((p.dtype, 1)) or real_softmax(p, *a))
    ref_terms, ref = _loss_and_grads(model, ids)
    assert {dt for dt, _ in seen} == {torch.float32}
    errs = {}
    for fold in (False, True):
        Attention.fold_heads = fold
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms, grads = _loss_and_grads(model, ids)
        assert {dt for dt, _ in seen} == ({torch.bfloat16} if fold else {torch.float32})
        assert {heads for _, heads in seen} == ({1} if fold else {model.config.num_attention_heads})
        torch.testing.assert_close(terms.loss, ref_terms.loss, rtol=5e-3, atol=5e-3)
        errs[fold] = sorted(((grads[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item() for k in ref)
    median = {fold: e[len(e) // 2] for fold, e in errs.items()}
    assert median[True] < 0.05 and median[True] < 1.5 * median[False], median
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 16)
        model(ids[:1, :1], cache=cache)                              # a one-query block: per head
    assert seen and {heads for _, heads in seen} == {model.config.num_attention_heads}


@pytest.mark.parametrize("bmm_softmax", [True, False])
def test_indexer_target_reuses_the_attention_lse(plain_paths, monkeypatch, bmm_softmax):
    """Under bf16 autocast (folded attention) the indexer's KL target takes the joint
    log-normaliser from the attention kernel (`Attention.reuse_lse`) instead of recomputing the
    window logits: the KL and recall terms, the loss and every gradient as with the recompute,
    to fp32 rounding of the normaliser, and no window logits formed again."""
    if bmm_softmax and not cpu_kernels.available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(Attention, "bmm_softmax", bmm_softmax)
    torch.manual_seed(0)
    model = Transformer(_tiny())
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.attn_sink.normal_(0, 1.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 150))
    recomputed = []
    real_logits = Attention._logits
    monkeypatch.setattr(Attention, "_logits", lambda self, *a: recomputed.append(1) or real_logits(self, *a))
    results = {}
    for reuse in (False, True):
        monkeypatch.setattr(Attention, "reuse_lse", reuse)
        recomputed.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[reuse] = _loss_and_grads(model, ids, indexer_weight=1.0)
        csa = sum(layer.attn.indexer is not None for layer in model.layers)
        assert len(recomputed) == (0 if reuse else csa) and csa > 0
    (ref, g_ref), (out, g_out) = results[False], results[True]
    assert ref.indexer > 0
    for term in ("loss", "ce", "indexer", "indexer_recall"):
        torch.testing.assert_close(getattr(out, term), getattr(ref, term), rtol=1e-5, atol=1e-6)
    # (the kernel's scores and the recomputed ones are bf16 products of the same inputs whose
    # roundings may differ in the last bit, which moves the indexer's gradients by ~1e-3: a
    # normaliser of the wrong rows, heads or without the sink moves them by far more)
    _assert_grads_close(g_ref, g_out, rtol=1e-2)


def _folded_inputs(dtype, g=5, bq=6, h=4, k=23, d=16, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(g, 1, bq * h, d, dtype=torch.float64)
    kv = torch.randn(g, 1, k, d, dtype=torch.float64)
    mask = torch.zeros(g, bq, k, dtype=torch.float64).masked_fill(torch.rand(g, bq, k) < 0.4, float("-inf"))
    mask[2, 1] = float("-inf")                     # a row that sees nothing but the sink
    sink = torch.randn(h, dtype=torch.float64)
    grad = torch.randn(g, 1, bq * h, d, dtype=torch.float64)
    return [t.to(dtype) for t in (q, kv, mask)] + [sink, grad.to(dtype)]


def _folded_run(fn, q, kv, mask, sink, grad, *extra):
    """[out, d q, d kv, d sink, lse] of one folded attention Function."""
    q, kv, sink = (t.detach().clone().requires_grad_() for t in (q, kv, sink))
    out, lse = fn.apply(q, kv, mask, sink, 0.25, *extra)
    assert not lse.requires_grad
    return [out, *torch.autograd.grad(out, (q, kv, sink), grad), lse.reshape(q.shape[0], -1)]


def test_bmm_sink_attention_equals_the_flash_path_float64():
    """_BmmSinkAttention (batched products around the sink softmax; PyTorch's softmax formula in
    float64) against the folded flash path: output, the query, key/value and sink gradients and
    the rows' log-normalisers to float64 rounding, a row that sees only the sink included."""
    args = _folded_inputs(torch.float64)
    ref = _folded_run(attention._FoldedSinkAttention, *args, 2)
    got = _folded_run(attention._BmmSinkAttention, *args)
    for a, c in zip(ref, got):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    assert got[0][2, 0, 4:8].abs().max() == 0           # the sink-only row's output is exactly 0


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler")
def test_bmm_sink_attention_bf16_kernels():
    """The C sink softmax (kernels/attn.h) against PyTorch's formula on the same bf16 scores: the
    probabilities within one bf16 rounding, the log-normalisers to fp32 rounding, a hidden key's
    probability exactly 0; its backward pass likewise; the same bits at 1 and 3 threads; and the
    whole Function in bf16 within bf16 error of float64."""
    q, kv, mask, sink, grad = _folded_inputs(torch.bfloat16)
    s = torch.bmm(q[:, 0], kv[:, 0].transpose(1, 2))
    z = s.double() * 0.25 + mask.double().repeat_interleave(4, dim=1)
    zs = torch.cat([z, sink.view(1, 1, 4).repeat(1, 1, z.shape[1] // 4).transpose(1, 2).expand(z.shape[0], -1, 1)], -1)
    p_ref, lse_ref = torch.softmax(zs, -1)[..., :-1], torch.logsumexp(zs, -1)
    outs = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            p = s.clone()
            lse = cpu_kernels.attn_softmax(p, mask, sink, 4, 0.25)
            dp = torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
            delta = torch.randn(s.shape[:2], generator=torch.Generator().manual_seed(2))
            ds = dp.clone()
            cpu_kernels.attn_softmax_backward(ds, p, delta, 0.25)
        finally:
            torch.set_num_threads(2)
        outs.append((p, lse, ds))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    p, lse, ds = outs[0]
    torch.testing.assert_close(p.double(), p_ref, rtol=2 ** -8, atol=1e-30)
    assert (p[mask.repeat_interleave(4, dim=1) == float("-inf")] == 0).all()
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-6)
    bad = s.clone()
    bad[1, 3, 5] = float("nan")                          # a NaN score poisons its row only
    cpu_kernels.attn_softmax(bad, mask, sink, 4, 0.25)
    assert bad[1, 3].isnan().all() and not bad[1, 2].isnan().any() and not bad[0].isnan().any()
    ds_ref = p.double() * (dp.double() - delta.double().unsqueeze(-1)) * 0.25
    torch.testing.assert_close(ds.double(), ds_ref, rtol=2 ** -8, atol=1e-30)
    ref = _folded_run(attention._FoldedSinkAttention, *_folded_inputs(torch.float64), 2)
    got = _folded_run(attention._BmmSinkAttention, q, kv, mask, sink.float(), grad)
    for a, c in zip(ref, got):
        assert ((c.double() - a).norm() / a.norm()) < 0.02


def test_sdpa_attention_cached_decode_equals_reference(plain_paths):
    torch.manual_seed(1)
    model = Transformer(_tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 90))
    outs = []
    for fused in (False, True):
        Attention.use_sdpa = fused
        with torch.no_grad():
            cache = model.new_cache(2, 128)
            first = model(ids[:, :70], cache=cache)
            steps = [model(ids[:, i : i + 1], cache=cache) for i in range(70, 90)]
        outs.append(torch.cat([first, *steps], dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(cls, name, counted)
    return calls


def _prefill_and_decode(model, ids, split: int, cache_len: int):
    """Logits of a chunked cached prefill (two chunks) then one-token steps, rows side by side."""
    cache = model.new_cache(ids.shape[0], cache_len)
    outs = [model(ids[:, :7], cache=cache), model(ids[:, 7:split], cache=cache)]
    outs += [model(ids[:, i : i + 1], cache=cache) for i in range(split, ids.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunk_bytes", [Attention.SPARSE_CHUNK_BYTES, 1])   # 1: one query block a chunk
def test_gathered_csa_equals_the_op_by_op_reference(plain_paths, monkeypatch, chunk_bytes):
    """The gathered CSA path (each query's top-k entries gathered, inference) against the
    op-by-op joint softmax over every entry with the top-k mask (use_sdpa = False): an uncached
    forward in float64, and (fp32: the compressor state is fp32) a chunked cached prefill
    followed by decode steps of two rows."""
    monkeypatch.setattr(Attention, "sparse_min_ratio", 1)   # tiny contexts: gather from N >= k on
    monkeypatch.setattr(Attention, "sparse_min_decode_entries", 1)
    monkeypatch.setattr(Attention, "SPARSE_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(3)
    model = perturbed(Transformer(_tiny(index_topk=3)), seed=5).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 75))
    calls = _count_calls(monkeypatch, Attention, "_attend_sparse")
    results = []
    for reference in (False, True):
        Attention.use_sdpa = not reference
        with torch.no_grad():
            uncached = model.double()(ids)
            cached = _prefill_and_decode(model.float(), ids, 60, 80)
        results.append((uncached, cached))
        # two CSA layers, gathered: the uncached call, the second chunk, 15 steps (the first
        # chunk's 7 tokens make 1 entry, fewer than k: nothing to select)
        assert len(calls) == 2 * (1 + 1 + 15)
    (got64, got), (want64, want) = results
    torch.testing.assert_close(got64, want64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gathered_csa_only_without_autograd_and_past_the_thresholds(plain_paths, monkeypatch):
    """Training (autograd) and short contexts keep the masked dense path (chunks: N against
    sparse_min_ratio * k; decode steps: against sparse_min_decode_entries); the fp32 model's
    gathered and dense outputs agree."""
    torch.manual_seed(4)
    model = perturbed(Transformer(_tiny(index_topk=3)), seed=6).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 65))   # 16 entries a CSA layer
    calls = _count_calls(monkeypatch, Attention, "_attend_sparse")
    model(ids).sum()   # with autograd
    monkeypatch.setattr(Attention, "sparse_min_decode_entries", 17)
    with torch.no_grad():
        monkeypatch.setattr(Attention, "sparse_min_ratio", 6)   # 16 < 6 x 3
        cache = model.new_cache(1, 80)
        dense = torch.cat([model(ids[:, :64], cache=cache), model(ids[:, 64:], cache=cache)], dim=1)
        assert not calls
        monkeypatch.setattr(Attention, "sparse_min_ratio", 5)   # 16 >= 5 x 3
        monkeypatch.setattr(Attention, "sparse_min_decode_entries", 16)
        cache = model.new_cache(1, 80)
        gathered = torch.cat([model(ids[:, :64], cache=cache), model(ids[:, 64:], cache=cache)], dim=1)
        assert len(calls) == 2 * 2   # two CSA layers: the prefill and the decode step
    torch.testing.assert_close(gathered, dense, rtol=1e-5, atol=1e-5)


def test_gathered_csa_with_bf16_weights(plain_paths, monkeypatch):
    """bf16 weights and cache (`--dtype bf16` decoding): the gathered path, in fp32 arithmetic as
    the masked one, gives the same logits to bf16 rounding."""
    monkeypatch.setattr(Attention, "sparse_min_ratio", 1)
    monkeypatch.setattr(Attention, "sparse_min_decode_entries", 1)
    torch.manual_seed(4)
    model = perturbed(Transformer(_tiny(index_topk=3)), seed=6).eval().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 75))
    calls = _count_calls(monkeypatch, Attention, "_attend_sparse")
    outs = []
    for gathered in (True, False):
        monkeypatch.setattr(Attention, "sparse_gather", gathered)
        with torch.no_grad():
            outs.append(_prefill_and_decode(model, ids, 60, 80))
    assert len(calls) == 2 * (1 + 15)
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


def test_mhc_functions_gradcheck_float64():
    torch.manual_seed(0)
    n, d = 3, 5
    logits = torch.randn(2, 4, n, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: hc._Sinkhorn.apply(x, 4, 1e-6), (logits,))
    flat = torch.randn(6, n * d, dtype=torch.float64, requires_grad=True)
    fn = torch.randn(n * n + 2 * n, n * d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hc._MixRMS.apply(a, b, 1e-6), (flat, fn))
    args = (torch.randn(2, 3, d, dtype=torch.float64), torch.randn(2, 3, n, d, dtype=torch.float64),
            torch.rand(2, 3, n, dtype=torch.float64), torch.rand(2, 3, n, n, dtype=torch.float64))
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(hc._StreamMix.apply, args)
    w = torch.rand(2, 3, n, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, n, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hc._WeightedSum.apply, (w, x))


def test_mhc_fused_equals_plain(plain_paths):
    torch.manual_seed(0)
    site = hc.HyperConnection(16, 4, 20, 1e-6, 1e-6)
    torch.nn.init.normal_(site.fn, std=0.1)
    torch.nn.init.normal_(site.base, std=0.5)
    streams0 = torch.randn(2, 7, 4, 16)
    weights = torch.randn(2, 7, 4, 16)
    results = []
    for fused in (False, True):
        hc.HyperConnection.fused = fused
        site.zero_grad()
        streams = streams0.clone().requires_grad_()
        x, post, comb, mixed = site.collapse(streams)
        out = site.expand(torch.tanh(x), mixed, post, comb)
        (out * weights).sum().backward()
        results.append([out.detach(), comb.detach(), streams.grad, site.fn.grad, site.base.grad, site.scale.grad])
    for a, b in zip(*results):  # fp32 (exactness is gradcheck's job above): summation order only
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # the inference path (no grad) uses the in-place Sinkhorn: the same matrices
    with torch.no_grad():
        _, _, comb_ng, _ = site.collapse(streams0)
    torch.testing.assert_close(comb_ng, results[1][1], rtol=1e-6, atol=1e-7)


def test_mhc_stays_fp32_under_autocast():
    """bf16 autocast must not reach the mHC arithmetic (spec: fp32), forward or backward."""
    torch.manual_seed(0)
    site = hc.HyperConnection(16, 4, 20, 1e-6, 1e-6)
    torch.nn.init.normal_(site.fn, std=0.1)
    streams0 = torch.randn(2, 7, 4, 16)
    results = []
    for autocast in (False, True):
        site.zero_grad()
        streams = streams0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x, post, comb, mixed = site.collapse(streams)
            out = site.expand(torch.tanh(x), mixed, post, comb)
        assert out.dtype == torch.float32
        (out * streams0).sum().backward()
        results.append([out.detach(), streams.grad, site.fn.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


_HC_MODES = {   # how a bf16-streams site runs: the switches set (class, attribute, value)
    "plain": [(hc.HyperConnection, "fused", False)],
    "functions": [(cpu_kernels, "enabled", False)],
    "kernels": [(hc.HyperConnection, "collapse_function", False)],   # (the composed Functions' kernels)
    "collapse": [(hc.HyperConnection, "COLLAPSE_MIN_ELEMENTS", 0)],
    "collapse-gemm": [(hc.HyperConnection, "COLLAPSE_MIN_ELEMENTS", 0), (hc.HyperConnection, "mix_kernels", False)],
}


def _bf16_site(monkeypatch, mode: str) -> hc.HyperConnection:
    """A seeded 4-stream site of width 64 (fn drawn), with `mode`'s switches set."""
    if mode not in ("plain", "functions") and not cpu_kernels.available():
        pytest.skip("no C compiler (tests/model/test_cpu_kernels.py fails for that in CI)")
    for switch in _HC_MODES[mode]:
        monkeypatch.setattr(*switch)
    torch.manual_seed(0)
    site = hc.HyperConnection(64, 4, 20, 1e-6, 1e-6)
    torch.nn.init.normal_(site.fn, std=0.1)
    return site


@pytest.mark.parametrize("mode", list(_HC_MODES))
def test_mhc_on_bf16_streams_computes_in_fp32(plain_paths, monkeypatch, mode):
    """bf16 streams (Transformer.autocast_streams): a site's collapse + expand, forward and
    backward, on every path (the plain formulas, the composed Functions without C kernels, the
    C kernels, the whole-collapse Function with and without its mix kernels) gives the float64
    result from the same bf16 values within bf16's rounding of each stored result: outputs and
    the streams' gradient in bf16, the block input in bf16, fn's gradient in fp32."""
    site = _bf16_site(monkeypatch, mode)
    torch.nn.init.normal_(site.base, std=0.5)
    streams0 = torch.randn(2, 9, 4, 64).bfloat16()
    weights = torch.randn(2, 9, 4, 64).bfloat16()

    def run(dtype):
        site.to(torch.float64 if dtype == torch.float64 else torch.float32).zero_grad()
        streams = streams0.clone().to(dtype).requires_grad_()
        x, post, comb, mixed = site.collapse(streams)
        y = torch.tanh(x)
        out = site.expand(y, mixed, post, comb)
        (out * weights.to(dtype)).sum().backward()
        return x, out, streams.grad, site.fn.grad.clone(), site.base.grad.clone()

    x, out, g_streams, g_fn, g_base = run(torch.bfloat16)
    assert x.dtype == out.dtype == g_streams.dtype == torch.bfloat16 and g_fn.dtype == torch.float32
    monkeypatch.setattr(hc.HyperConnection, "fused", False)   # the float64 oracle: the plain formulas
    ref = run(torch.float64)
    # (relative to each result's norm: y = tanh(x) is itself rounded to bf16, and the expand's
    # cancellations make single entries of `out` and the gradients relatively far off; measured
    # 0.0016 for x, 0.002-0.0035 for the others, against one bf16 rounding, 2^-9 = 0.002)
    for name, got, want, bound in zip(("x", "out", "d streams", "d fn", "d base"), (x, out, g_streams, g_fn, g_base),
                                      ref, (2**-8, 0.01, 0.01, 0.01, 0.01)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < bound, f"{name}: {err:.2e}"


@pytest.mark.parametrize("mode", ["kernels", "collapse"])
def test_mhc_kernels_on_bf16_streams_make_no_fp32_copy_of_them(plain_paths, monkeypatch, mode):
    """Where the C kernels take bf16 streams, nothing widens them first: no fp32 tensor of the
    streams' size is made by the expand (forward and backward; an eager widening that only the
    PyTorch fallbacks use once cost 0.8 ms and 32 MiB of a `small` site), nor by the whole
    collapse Function. (The composed collapse, which bf16 streams take only with that Function
    switched off, widens for its fp32 GEMM by design: `kernels` checks the expand alone.)"""
    site = _bf16_site(monkeypatch, mode)
    streams = torch.randn(2, 64, 4, 64).bfloat16().requires_grad_()   # (4x the mix workspace: fn's size)
    weights = torch.randn(streams.shape).bfloat16()
    made = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16 and t.numel() >= streams.numel():
                    made.append((func.__name__, tuple(t.shape), t.dtype))
            return out

    whole = mode == "collapse"
    with Record() if whole else contextlib.nullcontext():
        x, post, comb, mixed = site.collapse(streams)
    if not whole:
        x, post, comb, mixed = (t.detach().requires_grad_() for t in (x, post, comb, mixed))
    with Record():
        out = site.expand(torch.tanh(x), mixed, post, comb)
        (out * weights).sum().backward()   # (a bf16 loss: its own ops make no fp32 tensor)
    assert (streams if whole else mixed).grad is not None and made == [], made


def test_bf16_streams_under_autocast_train_as_close_as_fp32_streams():
    """Under bf16 autocast the model's streams are bf16 (fp32 with Transformer.autocast_streams
    off, and without autocast), and a training step's loss and gradients are as close to the
    fp32 model's as those of autocast with fp32 streams: bf16's products dominate the error."""
    torch.manual_seed(0)
    model = perturbed(Transformer(_tiny())).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    flat = lambda grads: torch.cat([g.flatten().double() for g in grads.values()])   # noqa: E731

    def step(autocast: bool, bf16_streams: bool):
        Transformer.autocast_streams = bf16_streams
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, grads = _loss_and_grads(model, ids)
                with torch.no_grad():
                    streams = model(ids, return_streams=True)[1]
        finally:
            Transformer.autocast_streams = True
        return out.loss.item(), flat(grads), streams.dtype

    ref_loss, ref_grad, dtype = step(False, True)
    assert dtype == torch.float32
    results = {on: step(True, on) for on in (False, True)}
    assert results[False][2] == torch.float32 and results[True][2] == torch.bfloat16
    err = {on: (abs(r[0] - ref_loss), ((r[1] - ref_grad).norm() / ref_grad.norm()).item()) for on, r in results.items()}
    assert err[True][0] < 5e-3 and err[True][1] < 1.5 * err[False][1], err
    assert 0 < err[False][1] < 0.2   # (the bound above is not vacuous: autocast itself is off by this)


def _rmsnorm_kernel(monkeypatch, on: bool):
    """The C kernel (cpu_kernels.rms_norm, kernels/norm.h) switched on or off for one test."""
    if on and not cpu_kernels.available():
        pytest.skip("no C compiler (tests/model/test_cpu_kernels.py fails for that in CI)")
    monkeypatch.setattr(cpu_kernels, "enabled", on)


@pytest.mark.parametrize("kernel", [False, True])
def test_rmsnorm_function_gradcheck_float64(monkeypatch, kernel):
    """The Function's backward by PyTorch ops (kernels off) and by the C kernel, which it must take."""
    _rmsnorm_kernel(monkeypatch, kernel)
    calls = []
    real = cpu_kernels.rms_norm_backward
    monkeypatch.setattr(cpu_kernels, "rms_norm_backward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    for shape in ((3, 5, 7), (1, 17)):   # and a single token, d not a multiple of the kernel's lanes
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: norm._RMSNorm.apply(a, b, 1e-6), (x, w))
        assert torch.autograd.gradcheck(lambda a: norm._RMSNorm.apply(a, None, 1e-6), (x,))
    assert bool(calls) == kernel


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_equals_plain(plain_paths, monkeypatch, dtype, kernel):
    """RMSNorm and rms_normalize (fp32 out, or x's dtype: attention's per-head use) by the
    Function, with PyTorch ops (kernels off) or the C kernel, against the plain formula."""
    _rmsnorm_kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    layer = norm.RMSNorm(48, 1e-6)
    torch.nn.init.normal_(layer.weight, 1.0, 0.3)
    x0 = (torch.randn(2, 9, 48) * 3).to(dtype)
    g = torch.randn(2, 9, 48)
    results = []
    for fused in (False, True):
        norm.RMSNorm.fused = fused
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y = layer(x)
        z = norm.rms_normalize(x, 1e-6)  # the unweighted per-head variant
        q = norm.rms_normalize(x, 1e-6, keep_dtype=True)
        assert y.dtype == q.dtype == dtype and z.dtype == torch.float32
        (y.float() * g).sum().add((z * g).sum()).add((q.float() * g).sum()).backward()
        assert x.grad.dtype == dtype
        results.append([y.float(), z, q.float(), x.grad.float(), layer.weight.grad])
    if not kernel:  # the PyTorch Function's forward is the plain formula's ops, bit for bit
        assert all(torch.equal(results[1][i], results[0][i]) for i in range(3))
    # the backward is the textbook formula; the kernel's sums run in another order (bf16: 1 ulp)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tol)
    with torch.no_grad():  # inference: the plain formula (kernels off) or the kernel
        torch.testing.assert_close(layer(x0).float(), results[0][0], **tol)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_grad_and_no_grad_forwards_agree(plain_paths, monkeypatch, dtype, kernel):
    """A no-grad pass (e.g. GRPO's old log-probs) sees the training pass's bits: RMSNorm (x or
    only the weight wanting a gradient) and both rms_normalize outputs, kernel or PyTorch ops."""
    _rmsnorm_kernel(monkeypatch, kernel)
    torch.manual_seed(1)
    layer = norm.RMSNorm(40, 1e-6)
    torch.nn.init.normal_(layer.weight, 1.0, 0.3)
    x = (torch.randn(3, 11, 40) * 2).to(dtype)
    for fn in (layer, lambda t: norm.rms_normalize(t, 1e-6), lambda t: norm.rms_normalize(t, 1e-6, keep_dtype=True)):
        with torch.no_grad():
            ref = fn(x)
        out = fn(x.clone().requires_grad_())
        assert out.grad_fn is not None and torch.equal(out.detach(), ref)
        assert torch.equal(fn(x).detach(), ref)   # RMSNorm: a gradient for the weight only


@pytest.mark.parametrize("case", ["heads", "no_pass_through", "strided", "bf16", "inverse"])
def test_rope_complex_equals_real(plain_paths, case):
    from nanoseek.model.rope import apply_rope, inv_frequencies, rope_angles
    torch.manual_seed(0)
    rd = 16
    cos, sin = rope_angles(torch.arange(11).expand(2, 11) * 3, inv_frequencies(rd, 10000.0))
    x0 = {"heads": torch.randn(2, 11, 3, 64), "no_pass_through": torch.randn(2, 11, rd),
          # odd strides: the rotated channels cannot be viewed as complex numbers in place
          "strided": torch.randn(2, 11, 3, 67)[..., 1:66:1][..., :65][..., 1:],
          "bf16": torch.randn(2, 11, 3, 64).bfloat16(), "inverse": torch.randn(2, 11, 64)}[case]
    g = torch.randn(x0.shape)
    results = []
    for use in (False, True):
        rope.use_complex = use
        x = x0.clone() if case != "strided" else x0.detach()
        x.requires_grad_()
        y = apply_rope(x, cos, sin, inverse=case == "inverse")
        (y.float() * g).sum().backward()
        assert y.dtype == x0.dtype and y.shape == x0.shape
        results.append([y.float(), x.grad.float()])
    for a, b in zip(*results):  # the same products and sums: equal up to fused multiply-add rounding
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0][0], x0.float())  # the rotation did something


def test_linear_cross_entropy_equals_torch(monkeypatch):
    from nanoseek.model import loss
    monkeypatch.setattr(loss, "_CHUNK_ELEMENTS", 1 << 16)  # 65 rows a chunk: five chunks, the last partial
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(1000, 32, requires_grad=True)
    labels = torch.randint(0, 1000, (300,))
    labels[::7] = -100
    ours = linear_cross_entropy(h, w, labels)
    (ours * 2.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), labels)
    (ref * 2.5).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)
    # every label ignored: NaN, as F.cross_entropy
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((300,), -100)))
    # no gradient wanted: the value alone
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels), ref.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_cross_entropy_kernel_equals_pytorch_ops(monkeypatch, dtype):
    """The head's per-chunk softmax / target / gradient as one C call (cpu_kernels.cross_entropy_rows)
    against `_chunk`'s PyTorch ops: the loss and both gradients, with ignored rows and a partial
    last chunk; fp32 and bf16 logits take the kernel, fp64 (rounded to fp32 like the others) not."""
    from nanoseek.model import loss
    if not cpu_kernels.available():
        pytest.skip("no C compiler (tests/model/test_cpu_kernels.py fails for that in CI)")
    monkeypatch.setattr(loss, "_CHUNK_ELEMENTS", 1 << 16)
    torch.manual_seed(0)
    h0, w0 = torch.randn(300, 32, dtype=dtype) * 2, torch.randn(1000, 32, dtype=dtype)
    labels = torch.randint(0, 1000, (300,))
    labels[::7] = -100
    calls = []
    real = cpu_kernels.cross_entropy_rows
    monkeypatch.setattr(cpu_kernels, "cross_entropy_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for on in (False, True):
        monkeypatch.setattr(cpu_kernels, "enabled", on)
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = linear_cross_entropy(h, w, labels)
        (out * 2.5).backward()
        results.append((out, h.grad, w.grad))
    assert len(calls) == (0 if dtype == torch.float64 else 5)   # five chunks, all in the kernel
    (ref, gh_ref, gw_ref), (ours, gh, gw) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)


def test_model_loss_fused_head_equals_logits_path():
    torch.manual_seed(0)
    model = Transformer(_tiny()).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    labels = ids.roll(-1, 1)
    labels[:, ::5] = -100
    kept, g_kept = _loss_and_grads(model, ids, labels=labels, return_logits=True)
    fused, g_fused = _loss_and_grads(model, ids, labels=labels)
    assert kept.logits is not None and fused.logits is None
    for term in ("loss", "ce", "mtp"):  # both round the logits to fp32 (as the model always does)
        torch.testing.assert_close(getattr(fused, term), getattr(kept, term), rtol=1e-6, atol=1e-6)
    _assert_grads_close(g_kept, g_fused, rtol=1e-4)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model.loss(ids, labels=labels, return_logits=True)
        b = model.loss(ids, labels=labels)
    torch.testing.assert_close(b.ce, a.ce, rtol=1e-3, atol=1e-3)


def test_rows_linear_equals_linear():
    torch.manual_seed(0)
    w = torch.randn(8192, 512)  # 16 MB: the `small` head
    for x in (torch.randn(1, 512), torch.randn(2, 1, 512)):
        with torch.no_grad():
            assert gemv.applies(x, w)
            torch.testing.assert_close(gemv.rows_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert not gemv.applies(torch.randn(64, 512), w)  # prefill: a GEMM, F.linear's job
    assert not gemv.applies(torch.randn(1, 64), torch.randn(128, 64))  # small weights stay
    x = torch.randn(1, 512, requires_grad=True)
    assert not gemv.applies(x, w)  # autograd needs F.linear's backward
    y = gemv.rows_linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).unsqueeze(0), rtol=1e-4, atol=1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemv.applies(torch.randn(1, 512), w)


def test_decode_head_rows_linear_equals_full_forward(monkeypatch):
    monkeypatch.setattr(gemv, "MIN_BYTES", 0)  # the tiny head is small: force the path
    torch.manual_seed(0)
    model = Transformer(_tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(gemv.torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 64)
        first = model(ids[:, :30], cache=cache)
        steps = [model(ids[:, i : i + 1], cache=cache) for i in range(30, 40)]
    assert len(calls) == 10  # one per decode step, none for the 30-token prefill or the full pass
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-4, atol=1e-4)


def _graph_ops(fn, *args) -> set[str]:
    """The torch functions / methods in the graph dynamo captures for fn(*args) (run eagerly)."""
    ops: set[str] = set()

    def backend(gm, example_inputs):
        ops.update(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                   if n.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return ops, out


def test_linear_in_a_compiled_graph_is_a_reduction():
    """In a graph, without autograd, up to MAX_ROWS rows: multiply + sum, not a linear; with more
    rows, gradients, or outside a graph, F.linear. Values equal the float64 product."""
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    for rows, grad, reduced in ((1, False, True), (gemv.MAX_ROWS, False, True), (gemv.MAX_ROWS + 1, False, False),
                                (1, True, False)):
        x = torch.randn(rows, 40, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            ops, y = _graph_ops(lambda x: gemv.linear(x, w), x)
        assert ("linear" not in ops and {"mul", "sum"} <= ops) == reduced, (rows, grad, ops)
        torch.testing.assert_close(y.detach().double(), x.detach().double() @ w.double().t(), rtol=1e-5, atol=1e-5)
    assert gemv.linear(torch.randn(1, 40), w).shape == (1, 96)  # eager: F.linear (no graph)
    layer = gemv.Linear(40, 96, bias=True)
    assert set(layer.state_dict()) == {"weight", "bias"}  # nn.Linear's names: checkpoints are unchanged
    with torch.no_grad():
        ops, y = _graph_ops(layer, x.detach()[:1])
        torch.testing.assert_close(y, F.linear(x.detach()[:1], layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert "linear" not in ops


def test_compiled_decode_products_with_inductor():
    """The code inductor generates for the reductions (the engine's decode step on CPU): a
    Linear, the mHC mix / weighted sum / stream mix of one decode token and the one-query
    attention, against float64."""
    torch.manual_seed(0)
    layer = gemv.Linear(64, 48, bias=False)
    site = hc.HyperConnection(16, 4, 3, 1e-6, 1e-6)
    with torch.no_grad():
        site.fn.normal_(0, 0.1)
    x, streams, y = torch.randn(2, 1, 64), torch.randn(2, 1, 4, 16), torch.randn(2, 1, 16)
    attn_args = _one_query_inputs(torch.float32)

    def step(x, streams, y, attn_args):
        mixed, post, comb, streams = site.collapse(streams)
        return layer(x), mixed, site.expand(y, streams, post, comb), attention.one_query_attention(*attn_args)

    torch._dynamo.reset()
    with torch.no_grad():
        want = [t.double() for t in step(x, streams, y, attn_args)]
        got = torch.compile(step, backend="inductor", fullgraph=True)(x, streams, y, attn_args)
    torch._dynamo.reset()
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the float64 products themselves
        torch.testing.assert_close(got[0].double(), x.double() @ layer.weight.double().t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[3].double(), _one_query_brute_force(*_one_query_inputs(torch.float64)),
                                   rtol=1e-5, atol=1e-5)


def _one_query_inputs(dtype, comp: bool = True):
    """A decode step's attention inputs (one_query_attention's layout), B=3, H=4, D=8, a window
    of 10 slots and 6 compressed entries: row 0 sees only some of each, row 1 none of its window
    (its first token) and none of the entries, row 2 everything; NEG-masked logits as the model
    writes them."""
    g = torch.Generator().manual_seed(3)
    b, h, d, kw, n = 3, 4, 8, 10, 6
    q = torch.randn(b, 1, h, d, generator=g, dtype=torch.float64).to(dtype)   # (the same values in every dtype)
    keys_t = torch.randn(b, 1, d, kw, generator=g, dtype=torch.float64).to(dtype)
    win = torch.ones(b, kw, dtype=torch.bool)
    win[0, ::3] = False
    win[1] = False
    win_bias = torch.zeros(b, kw, dtype=dtype).masked_fill(~win, attention.NEG)[:, None, None, :]
    entries = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype) if comp else None
    seen = torch.ones(b, 1, n, dtype=torch.bool)
    seen[0, 0, 2:5] = False
    seen[1] = False
    comp_bias = torch.zeros(b, 1, n, dtype=dtype).masked_fill(~seen, attention.NEG) if comp else None
    sink = torch.randn(h, generator=g, dtype=torch.float64).to(dtype)
    return q, keys_t, win_bias, entries, comp_bias, sink, d**-0.5


def _one_query_brute_force(q, keys_t, win_bias, comp, comp_bias, sink, scale):
    """The joint sink-softmax spelled out in float64: every visible key's logit and the sink's
    in one softmax, the sink's value zero."""
    b, _, h, d = q.shape
    out = torch.zeros(b, 1, h, d, dtype=torch.float64)
    for r in range(b):
        keys = keys_t[r, 0].double().t()  # [Kw, D]
        bias = win_bias.expand(b, 1, 1, -1)[r, 0, 0].double()
        if comp is not None:
            keys = torch.cat([keys, comp[r].double()])
            bias = torch.cat([bias, comp_bias[r, 0].double()])
        visible = bias > -1
        for head in range(h):
            z = torch.cat([keys[visible] @ q[r, 0, head].double() * scale, sink[head:head + 1].double()])
            p = torch.softmax(z, 0)
            out[r, 0, head] = p[:-1] @ keys[visible]
    return out


@pytest.mark.parametrize("comp", [True, False])
def test_one_query_attention_equals_the_joint_softmax_float64(comp):
    """one_query_attention (the compiled decode step's attention as reductions) against the joint
    softmax written out per row and head in float64, and against the fused kernel path
    (`Attention._sdpa`, what eager decode steps run) in fp32; a row that sees only the sink
    gets exactly 0."""
    args = _one_query_inputs(torch.float64, comp)
    got = attention.one_query_attention(*args)
    torch.testing.assert_close(got, _one_query_brute_force(*args), rtol=1e-12, atol=1e-12)
    if comp:
        assert got[1].abs().max() == 0
    q, keys_t, win_bias, entries, comp_bias, sink, _ = _one_query_inputs(torch.float32, comp)
    layer = Attention(_tiny(), "compressed_sparse_attention")
    layer.h, layer.d = q.shape[2], q.shape[3]
    with torch.no_grad():
        layer.attn_sink = torch.nn.Parameter(sink)
        fused, _ = layer._sdpa(q, keys_t, win_bias, entries, comp_bias, 1)
    torch.testing.assert_close(fused.double(), got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reductions", [True, False])
def test_compiled_decode_attention_is_reductions(plain_paths, monkeypatch, reductions):
    """Inside the compiled decode graphs (CPU) attention is multiply + sum reductions, no fused
    attention call (with `Attention.decode_reductions` off: the fused call, as eager runs); the
    steps' logits equal an eager twin's past compressed-entry boundaries, sliding, CSA and HCA
    layers alike."""
    monkeypatch.setattr(Attention, "decode_reductions", reductions)
    ops: set[str] = set()

    def capture(gm, example_inputs):
        ops.update(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.manual_seed(4)
    model = Transformer(_tiny()).eval()
    twin = Transformer(_tiny()).eval()
    twin.load_state_dict(model.state_dict())
    assert {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"} <= set(
        model.config.layer_types)
    model.compile_blocks(backend=capture, fullgraph=True, decode_only=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    outs = []
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for m in (twin, model):
                cache = m.new_cache(2, 64)
                m(ids[:, :21], cache=cache)
                outs.append(torch.cat([m(ids[:, i : i + 1], cache=cache) for i in range(21, 30)], dim=1))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    fused = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"} & ops
    assert bool(fused) != reductions, ops


def _experts(dtype=torch.float64, n=5, dim=12, inter=7):
    torch.manual_seed(0)
    ex = moe.Experts(n, dim, inter, 3.0).to(dtype)
    with torch.no_grad():
        for w in (ex.w1, ex.w2, ex.w3):
            w.normal_(0, 0.5)
    return ex


def _experts_pass(ex, x, idx, w, fused: bool, autocast: bool = False):
    moe.Experts.fused = fused
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ex.grouped(x, idx, w)
    assert (type(y.grad_fn).__name__ == "IndexAddBackward0")
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    grads = torch.autograd.grad((y.double() * weights).sum(), (x, w, ex.w1, ex.w2, ex.w3))
    return y.detach(), grads


@pytest.mark.parametrize("idle", [False, True])
@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("bucket", [1, 4])
def test_grouped_experts_function_equals_per_expert_loop(plain_paths, monkeypatch, idle, c_kernels, bucket):
    """Values and the gradients of the tokens, routing weights and all three stacked matrices in
    float64; with idle experts (no tokens: their gradients must be exact zeros) or none; with the
    C SwiGLU or without it (no compiler, GPUs: the backward's autograd fallback); with each
    expert's rows padded to a multiple of 4 (what bf16 on a CPU does with 32) or not."""
    monkeypatch.setattr(cpu_kernels, "enabled", c_kernels)
    monkeypatch.setattr(moe._GroupedExperts, "bucket", staticmethod(lambda x: bucket))
    ex = _experts()
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 3 if idle else 5, (9, 2))
    idx[:, 1] = (idx[:, 0] + 1) % (3 if idle else 5)
    if not idle:
        idx[:5, 0] = torch.arange(5)                               # every expert gets tokens
    ref, g_ref = _experts_pass(ex, x, idx, w, fused=False)
    out, g_out = _experts_pass(ex, x, idx, w, fused=True)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if idle:
        assert all(torch.equal(g[3:], torch.zeros_like(g[3:])) for g in g_out[2:])


def test_grouped_experts_function_under_bf16_autocast(plain_paths):
    """Under autocast the Function casts each stacked matrix once and computes in bf16, as the
    per-expert F.linear calls do: the same dtypes out, values and gradients at bf16 rounding."""
    ex = _experts(torch.float32, n=4, dim=64, inter=32)
    x = torch.randn(40, 64, requires_grad=True)
    w = torch.rand(40, 2, requires_grad=True)
    idx = torch.stack([torch.arange(40) % 4, (torch.arange(40) + 1) % 4], 1)
    ref, g_ref = _experts_pass(ex, x, idx, w, fused=False, autocast=True)
    out, g_out = _experts_pass(ex, x, idx, w, fused=True, autocast=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert [g.dtype for g in g_out] == [g.dtype for g in g_ref] == [torch.float32] * 5
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.parametrize("bucket", [1, 3])
def test_grouped_experts_function_gradcheck_float64(monkeypatch, bucket):
    monkeypatch.setattr(moe._GroupedExperts, "bucket", staticmethod(lambda x: bucket))
    ex = _experts(n=3, dim=5, inter=4)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    counts = [2, 0, 4]
    assert torch.autograd.gradcheck(lambda x, a, b, c: moe._GroupedExperts.apply(x, a, b, c, counts, 3.0),
                                    (x, ex.w1, ex.w2, ex.w3))


def test_expert_rows_bucketed():
    """The padded layout: each expert's rows start at a multiple of the bucket, in order."""
    rows, padded = moe._bucketed([3, 0, 5, 8], 4, "cpu")
    assert padded == [4, 0, 8, 8]
    assert rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12, 13, 14, 15, 16, 17, 18, 19]
    assert moe._bucketed([4, 0, 8], 4, "cpu") == (None, [4, 0, 8])  # nothing to pad: no copies
    assert moe._bucketed([3, 5], 1, "cpu") == (None, [3, 5])


def test_grouped_experts_bf16_products_use_row_buckets(monkeypatch):
    """bf16 on a CPU (oneDNN builds a kernel per new shape): every expert product's row count is
    a multiple of `row_bucket`, whatever the routing; fp32 keeps the exact counts. (The products
    are recorded where the Function hands them over, grouped_mm.mm_many: fp32 groups run as one
    MKL call that no dispatch mode sees.)"""
    seen = []
    real = moe.mm_many

    def recording(products, accumulate=False):
        seen.extend((a.shape, b.shape) for a, b, _ in products)
        real(products, accumulate)

    monkeypatch.setattr(moe, "mm_many", recording)
    ex = _experts(torch.float32, n=4, dim=64, inter=48)
    x = torch.randn(37, 64, requires_grad=True)
    w = torch.rand(37, 2, requires_grad=True)
    idx = torch.stack([torch.arange(37) % 4, (torch.arange(37) + 1) % 4], 1)  # 18 or 19 rows each
    for autocast, rows_ok in ((True, lambda r: r % 32 == 0), (False, lambda r: r in (18, 19))):
        seen.clear()
        _experts_pass(ex, x, idx, w, fused=True, autocast=autocast)
        ragged = [r for shapes in seen for shape in shapes for r in shape if r not in (64, 48)]
        assert len(seen) == 4 * 9 and ragged and all(rows_ok(r) for r in ragged), ragged


@pytest.mark.parametrize("shape", [(2, 5, 4, 6, 3), (1, 1, 2, 8, 8), (3, 7, 1, 4, 5)])
def test_grouped_projection_equals_the_einsum_float64(shape):
    """attention.grouped_projection (one bmm over groups-first rows) against the per-group
    einsum it replaced: values and both gradients in float64, and under bf16 autocast the same
    dtype out and values at bf16 rounding."""
    b, s, g, i, r = shape
    o = torch.randn(b, s, g, i, dtype=torch.float64, requires_grad=True)
    w = torch.randn(g, r, i, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(b, s, g * r, dtype=torch.float64)
    got = attention.grouped_projection(o, w)
    want = torch.einsum("bsgi,gri->bsgr", o, w).flatten(2)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    for a, c in zip(torch.autograd.grad((got * weights).sum(), (o, w)),
                    torch.autograd.grad((want * weights).sum(), (o, w))):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention.grouped_projection(o.float(), w.float())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), want.detach(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
