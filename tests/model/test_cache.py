"""Cache exactness: prefill + token-by-token decode equals the full forward (issue test 2)."""

import itertools

import pytest
import torch

from nanoseek import ModelConfig, Transformer

from .conftest import perturbed


def model_with_topk(topk: int, **overrides) -> Transformer:
    torch.manual_seed(0)
    return perturbed(Transformer(ModelConfig.from_preset("tiny", index_topk=topk, **overrides)), seed=7).eval()


@pytest.mark.parametrize("topk", [64, 3])  # 3 < the 22 CSA entries of 90 tokens: real selection
@pytest.mark.parametrize("prefill", [1, 6, 37])
def test_prefill_then_decode_equals_full_forward(topk, prefill):
    model = model_with_topk(topk)
    ids = torch.randint(0, model.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(topk))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=96)
        outs = [model(ids[:, :prefill], cache=cache)]
        for t in range(prefill, ids.shape[1]):
            outs.append(model(ids[:, t : t + 1], cache=cache))
    got = torch.cat(outs, dim=1)
    assert cache.pos.tolist() == [90, 90]
    assert (got - full).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_full_forward():
    model = model_with_topk(3)
    ids = torch.randint(0, model.config.vocab_size, (3, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 90)
        got = torch.cat([model(ids[:, a : a + 13], cache=cache) for a in range(0, 90, 13)], dim=1)
    assert (got - full).abs().max().item() <= 1e-4


def test_logits_to_keep_is_the_last_rows_and_advances_the_cache_alike():
    model = model_with_topk(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_to_keep=5), full[:, -5:], rtol=1e-5, atol=1e-6)  # (GEMM blocking)
        cache = model.new_cache(2, 48)
        last = model(ids[:, :30], cache=cache, logits_to_keep=1)  # the engine's prefill
        assert last.shape == (2, 1, model.config.vocab_size)
        steps = [model(ids[:, t : t + 1], cache=cache) for t in range(30, 40)]
    torch.testing.assert_close(last, full[:, 29:30], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 30:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


@pytest.mark.parametrize("last", ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"])
@pytest.mark.parametrize("keep", [1, 4])
def test_prefill_with_logits_to_keep_skips_the_last_blocks_other_rows(last, keep):
    """With logits_to_keep, a prefill chunk's last block computes only the kept rows
    (Block.forward_last): its FFN sees `keep` rows, yet the logits are the full forward's last
    rows, the cache holds exactly what a plain prefill leaves (every tensor), and the decode
    steps after it agree. Chunks of 13 on a 58-token prompt (windows of 16, compressed entries
    of 4 and 8 split across chunks), for each kind of last layer."""
    torch.manual_seed(0)
    kinds = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", last]
    cfg = ModelConfig.from_preset("tiny", index_topk=3, layer_types=kinds)
    model = perturbed(Transformer(cfg), seed=7).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(4))
    rows = []
    model.layers[-1].ffn.shared_experts.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0] // 2))

    def prefill(keep_rows):
        cache = model.new_cache(2, 72)
        outs = [model(ids[:, a : min(a + 13, 58)], cache=cache, logits_to_keep=keep_rows) for a in range(0, 58, 13)]
        return outs, cache

    with torch.no_grad():
        full = model(ids)
        rows.clear()
        outs, cache = prefill(keep)
        assert rows == [keep] * 5  # the last block's FFN ran on the kept rows only
        plain_outs, plain_cache = prefill(0)
    ends = [min(a + 13, 58) for a in range(0, 58, 13)]
    for out, plain, end in zip(outs, plain_outs, ends):
        assert out.shape[1] == keep
        torch.testing.assert_close(out, plain[:, -keep:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, full[:, end - keep : end], rtol=1e-4, atol=1e-4)
    for kind, a, b in zip(kinds, cache.layers, plain_cache.layers):
        torch.testing.assert_close(a.window, b.window, rtol=1e-5, atol=1e-6)
        for sa, sb in ((a.compressor, b.compressor), (a.indexer, b.indexer)):
            if sa is None:
                continue
            torch.testing.assert_close(sa.entries, sb.entries, rtol=1e-5, atol=1e-6)
            # the partial window's buffer: the previous window (overlapping CSA compressors) and
            # the 58 % m tokens buffered since; slots past those are stale in either cache
            m = sa.kv.shape[1] // (2 if kind == "compressed_sparse_attention" else 1)
            used = (m if kind == "compressed_sparse_attention" else 0) + 58 % m
            torch.testing.assert_close(sa.kv[:, :used], sb.kv[:, :used], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sa.gate[:, :used], sb.gate[:, :used], rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.pos, plain_cache.pos)
    with torch.no_grad():
        steps = [model(ids[:, t : t + 1], cache=cache) for t in range(58, 70)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 58:], rtol=1e-4, atol=1e-4)


def test_a_last_block_with_hooks_runs_whole_in_prefill():
    """A hook on the last block (FSDP2 gathers a block's parameters in one; a user's probe) sees
    the block's whole output: with a hook present, logits_to_keep does not prune it."""
    model = model_with_topk(3)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    seen = []
    model.layers[-1].register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        last = model(ids, cache=model.new_cache(1, 24), logits_to_keep=1)
        full = model(ids)
    assert seen == [20, 20]
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-4, atol=1e-4)


def test_rows_at_different_positions_decode_together():
    """Continuous batching: rows prefilled separately (different lengths) decode in one batch."""
    model = model_with_topk(3)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, model.config.vocab_size, (1, 60), generator=g)
    b = torch.randint(0, model.config.vocab_size, (1, 45), generator=g)
    with torch.no_grad():
        batch_cache = model.new_cache(2, 80)
        for row, seq, plen in ((0, a, 41), (1, b, 22)):
            single = model.new_cache(1, 80)
            model(seq[:, :plen], cache=single)
            batch_cache.copy_row_(row, single)
        assert batch_cache.pos.tolist() == [41, 22]
        steps = []
        for t in range(19):
            step_ids = torch.stack([a[0, 41 + t], b[0, 22 + t]]).unsqueeze(1)
            steps.append(model(step_ids, cache=batch_cache))
        got = torch.cat(steps, dim=1)
        ref_a = model(a[:, :60])[0, 41:60]
        ref_b = model(b[:, :41])[0, 22:41]
    assert (got[0] - ref_a).abs().max().item() <= 1e-4
    assert (got[1] - ref_b).abs().max().item() <= 1e-4


def test_topk_ties_prefer_most_recent_entry():
    from nanoseek.model.indexer import select_topk

    scores = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 1.0, 0.0]]])
    visible = torch.tensor([[[True, True, True, True, True, False]]])
    chosen = select_topk(scores, visible, 3)
    # 5.0 and 1.0, then the latest visible zero (index 3); never the invisible index 5
    assert chosen[0, 0].tolist() == [False, True, False, True, True, False]


def _topk_by_sort(scores, visible, k):
    """The tie rule spelled out: per row, visible entries ordered by score (descending), ties by
    index (latest first), NaN as +inf; the first k kept (a plain Python sort)."""
    out = torch.zeros_like(visible)
    for row in itertools.product(*map(range, scores.shape[:-1])):
        s, v = scores[row].tolist(), visible[row].tolist()
        key = [(float("inf") if x != x else x, j) for j, x in enumerate(s) if v[j]]
        for _, j in sorted(key, reverse=True)[:k]:
            out[row + (j,)] = True
    return out


@pytest.mark.parametrize("in_graph", [False, True])   # True: every row through the unique keys
@pytest.mark.parametrize("seed", range(6))
def test_topk_selection_matches_a_sort_with_the_tie_rule(seed, in_graph, monkeypatch):
    from nanoseek.model.indexer import select_topk

    if in_graph:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    g = torch.Generator().manual_seed(seed)
    n, k = 40, [1, 5, 16, 39][seed % 4]
    # few distinct values (many ties, including at the k-th score), rows with fewer than k
    # visible entries, NaN scores and zeros of both signs
    scores = torch.randint(0, 4, (3, 7, n), generator=g).float().relu_() - 1.0
    scores[0, 0, ::3] = float("nan")
    scores[1, :, ::2] *= -1.0   # -0.0 among the zeros: equal to +0.0, ties by index
    visible = torch.rand(3, 7, n, generator=g) < torch.linspace(0.05, 1.0, 7).view(1, 7, 1)
    for dtype in (torch.float32, torch.bfloat16):
        got = select_topk(scores.to(dtype), visible, k)
        assert torch.equal(got, _topk_by_sort(scores, visible, k)), dtype
        assert (got.sum(-1) == visible.sum(-1).clamp(max=k)).all()


def test_cache_errors_are_clear():
    model = model_with_topk(3)
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(2, 17, dtype=torch.long), cache=cache)
    cache.pos[1] = 3
    with pytest.raises(ValueError, match="same position"):
        model(torch.zeros(2, 4, dtype=torch.long), cache=cache)


def test_cache_bytes_match_info_formula():
    from nanoseek.model.info import cache_bytes

    model = model_with_topk(3)
    cache = model.new_cache(1, 4096)
    assert cache.nbytes() == cache_bytes(model.config, 4096, dtype_bytes=4)
    # the sliding window is a ring: its size does not grow with the context
    assert cache_bytes(model.config, 8192) - cache_bytes(model.config, 4096) < cache_bytes(model.config, 4096)


def test_rollback_after_verification_equals_never_having_seen_the_rejected_tokens():
    """Speculative decoding support: verify a draft in one call, keep a prefix, continue."""
    model = model_with_topk(3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (2, 80), generator=g)
    junk = torch.randint(0, model.config.vocab_size, (2, 80), generator=g)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 96, spec_tokens=6)
        outs = [model(ids[:, :30], cache=cache)]
        t = 30
        for keep in (3, 0, 6, 1, 2, 4):  # accepted prefix lengths, crossing CSA/HCA window ends
            snap = cache.snapshot()
            draft = torch.cat([ids[:, t : t + keep], junk[:, t + keep : t + 6]], dim=1)  # 6 tokens, 6-keep wrong
            verified = model(draft, cache=cache)
            model.rollback(cache, snap, keep)
            outs.append(verified[:, :keep])
            t += keep
        assert cache.pos.tolist() == [t, t]
        while t < 80:
            outs.append(model(ids[:, t : t + 1], cache=cache))
            t += 1
    assert (torch.cat(outs, dim=1) - full).abs().max().item() <= 1e-4


def test_rollback_refuses_more_than_the_spare_ring():
    model = model_with_topk(3)
    cache = model.new_cache(1, 64, spec_tokens=2)
    with torch.no_grad():
        model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
        snap = cache.snapshot()
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="spec_tokens"):
            model.rollback(cache, snap, 1)


def test_cached_mtp_equals_uncached_mtp():
    model = model_with_topk(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, streams = model(ids, return_streams=True)
        ref, _ = model.mtp_forward(streams[:, :-1], ids[:, 1:])  # uncached, like training
        cache = model.new_cache(2, 64, with_mtp=True)
        outs = [model.mtp_forward(streams[:, :20], ids[:, 1:21], cache=cache)[0]]
        for t in range(20, 49):
            outs.append(model.mtp_forward(streams[:, t : t + 1], ids[:, t + 1 : t + 2], cache=cache)[0])
    assert (torch.cat(outs, 1) - ref).abs().max().item() <= 1e-4
    # and it is the MTP loss's prediction: depth-1 logits at t predict token t+2
    t = model.loss(ids, mtp_weight=1.0, balance_alpha=0, indexer_weight=0)
    ce = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    assert torch.allclose(t.mtp, ce, atol=1e-5)


def test_compiled_kernels_give_the_same_logits():
    # (4 Sinkhorn iterations instead of 20: the same code, unrolled 4 times instead of 20, which
    # took inductor ~110 s to compile into an empty cache -- the slowest test of the suite)
    model = model_with_topk(3, hc_sinkhorn_iters=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        eager = model(ids)
        model.compile_kernels()
        compiled = model(ids)
        cache = model.new_cache(2, 48)
        model(ids[:, :30], cache=cache)
        step = model(ids[:, 30:31], cache=cache)
    assert (compiled - eager).abs().max().item() <= 1e-4
    assert (step[:, 0] - eager[:, 30]).abs().max().item() <= 1e-4
    # a call that records gradients keeps the eager autograd Functions: dynamo sees no new frame
    # (compiling the Sinkhorn backward would take inductor many minutes)
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    model.zero_grad()
    model.loss(ids).loss.backward()
    assert counters["frames"]["total"] == frames
    assert model.layers[0].hc_attn.fn.grad is not None


def test_cache_nbytes_is_what_allocate_holds():
    from nanoseek.model.cache import cache_nbytes

    model = model_with_topk(3)
    c = model.config
    for batch, max_len, dtype, spec, mtp in itertools.product((1, 3), (5, 97, 1000), (torch.float32, torch.bfloat16),
                                                              (0, 4), (False, True)):
        got = model.new_cache(batch, max_len, dtype=dtype, spec_tokens=spec, with_mtp=mtp).nbytes()
        assert model.cache_nbytes(batch, max_len, dtype=dtype, spec_tokens=spec, with_mtp=mtp) == got
        assert cache_nbytes(c, c.layer_types, batch, max_len, dtype.itemsize, spec,
                            c.mtp_layer_types if mtp else ()) == got


def test_a_cache_too_big_for_the_free_memory_is_refused_before_allocating(monkeypatch):
    from nanoseek.model import cache as cache_module

    model = model_with_topk(3)
    allocated = []
    real = cache_module.CompressorState.allocate.__func__
    monkeypatch.setattr(cache_module.CompressorState, "allocate",
                        classmethod(lambda cls, *a: allocated.append(a) or real(cls, *a)))
    monkeypatch.setattr(cache_module, "CHECK_BYTES", 1 << 20)
    monkeypatch.setattr(cache_module, "available_memory", lambda device: 2 << 20)
    with pytest.raises(ValueError, match=r"a decode cache of 1 x 40,000 tokens needs \d\.\d MiB, more than the 2\.0 MiB"
                                         r".*built for 512 positions"):
        model.new_cache(1, 40_000)  # ~5.5 MiB
    assert allocated == []  # refused before anything was allocated
    assert model.new_cache(1, 8_000).nbytes() == model.cache_nbytes(1, 8_000) < 2 << 20  # fits
    assert allocated
    monkeypatch.setattr(cache_module, "available_memory", lambda device: None)  # unknown: not checked
    assert model.new_cache(1, 40_000).nbytes() > 2 << 20
