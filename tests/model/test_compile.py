"""torch.compile of the model (Transformer.compile_blocks): same numbers as eager, and the pieces
documented as graph-break free stay so (fullgraph=True fails on any graph break).

Compiled runs use backend="aot_eager" (dynamo + AOT autograd's functionalisation of the cache
writes and the load counter, without inductor's code generation, which takes minutes on a small
CPU); the fullgraph checks use backend="eager" (dynamo tracing only), which is what detects
graph breaks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.attention import Attention
from nanoseek.model.context import ForwardContext


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


KINDS = {  # layer type -> MoE routing of that layer, one layer per kind
    "sliding_attention": "hash_moe",
    "compressed_sparse_attention": "moe",
    "heavily_compressed_attention": "moe",
}


def _model(seed=0, kinds=tuple(KINDS), mtp=1, routing=None):
    """A tiny model with one layer of each given kind. 3 Sinkhorn iterations instead of 20 keep
    tracing cheap (the loop is unrolled into the graph); nothing else changes."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=len(kinds), layer_types=list(kinds),
                                  mlp_layer_types=routing or [KINDS[k] for k in kinds], hc_sinkhorn_iters=3,
                                  num_nextn_predict_layers=mtp)
    model = Transformer(cfg)
    with torch.no_grad():  # non-zero mHC biases / sinks so that every path carries signal
        for name, p in model.named_parameters():
            if name.endswith(("base", "attn_sink", "ape")):
                p.normal_(0, 0.1)
    return model


def _packed_batch(vocab, b=2, s=40):
    ids = torch.randint(0, vocab, (b, s))
    doc = torch.zeros(b, s, dtype=torch.int32)
    doc[0, 13:] = 1
    doc[1, 30:] = 2
    return ids, doc


def test_compiled_loss_and_grads_match_eager():
    """One CSA layer (compressor, indexer scores / top-k / KL, learned routing with the load
    counter and balance loss, grouped experts across the graph break) on packed documents:
    AOT autograd's compiled backward gives eager's gradients. (One layer keeps the test cheap;
    the other block kinds run the same code paths minus the compressor / indexer, and their
    tracing is checked by the fullgraph tests below.)"""
    model = _model(kinds=("compressed_sparse_attention",), mtp=0)
    ids, doc = _packed_batch(model.config.vocab_size)

    def run():
        model.zero_grad()
        for m in model.moe_layers():
            m.load.zero_()
        t = model.loss(ids, doc_ids=doc)
        t.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        loads = torch.stack([m.load.clone() for m in model.moe_layers()])
        terms = torch.stack([t.loss, t.ce, t.mtp, t.balance, t.indexer, t.indexer_recall]).detach()
        return terms, grads, loads

    eager_terms, eager_grads, eager_loads = run()
    model.compile_blocks(backend="aot_eager", fullgraph=True)  # fullgraph: front/back have no break
    comp_terms, comp_grads, comp_loads = run()
    assert torch.isfinite(eager_terms).all() and eager_terms[4] > 0  # the indexer KL is live
    torch.testing.assert_close(comp_terms, eager_terms, rtol=1e-5, atol=1e-6)
    assert set(comp_grads) == set(eager_grads)
    for n in eager_grads:
        torch.testing.assert_close(comp_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert torch.equal(comp_loads, eager_loads) and comp_loads.sum() > 0  # load counter ran compiled
    model.uncompile_blocks()
    assert not model.blocks_compiled


@pytest.mark.parametrize("gathered", [False, True])
def test_compiled_decode_gives_eager_greedy_tokens(monkeypatch, gathered):
    """A batch of 2 rows at different positions (continuous batching) decoded greedily past
    several compressed-entry boundaries and past the sliding window, eager vs compiled.
    One CSA layer with hash routing: the window ring, both overlapping compressor state machines
    (main and indexer) and the hash gate; HCA's simpler compressor is traced by the fullgraph
    decode test below. `gathered`: the CSA layer attends to its top-k entries gathered
    (Attention._attend_sparse) instead of masked (16 entry slots against k = 8)."""
    if gathered:
        monkeypatch.setattr(Attention, "sparse_min_ratio", 1)
        monkeypatch.setattr(Attention, "sparse_min_decode_entries", 1)
    model = _model(seed=1, kinds=("compressed_sparse_attention",), mtp=0, routing=["hash_moe"]).eval()
    prompts = [torch.randint(0, model.config.vocab_size, (1, n)) for n in (21, 6)]

    def greedy(steps=24):
        cache = model.new_cache(2, 64)
        row = model.new_cache(1, 64)
        first = []
        with torch.no_grad():
            for r, p in enumerate(prompts):
                row.reset_row_(0)
                first.append(model(p, cache=row)[0, -1].argmax())
                cache.copy_row_(r, row, 0)
            tok = torch.stack(first)[:, None]
        out, logits, _ = _decode_steps(model, cache, tok, steps)
        return [tok[:, 0].tolist()] + out, logits, cache

    eager, eager_logits, eager_cache = greedy()
    model.compile_blocks(backend="aot_eager", fullgraph=True)  # fullgraph: the decode block has no break
    compiled, comp_logits, comp_cache = greedy()
    # the block and the step's tail (hyper head, norm, LM head) ran as one compiled graph
    assert [plan[0] for plan in model.__dict__["_decode_plan"]] == [(0,)] and len(model.__dict__["_compiled_ok"]) == 1
    assert compiled == eager
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_cache.layers, comp_cache.layers):  # the cache state itself agrees
        for ta, tb in zip(a.tensors(), b.tensors()):
            torch.testing.assert_close(tb, ta, rtol=1e-4, atol=1e-5)


def test_decode_groups_pick_the_alignment_with_least_to_compile():
    """decode_groups splits the blocks into graphs of consecutive pairs: of the two alignments,
    the one whose distinct runs hold the fewest blocks (the last run, which carries the tail,
    always counts), then the one with fewer runs; every layer appears once, in order."""
    from nanoseek.model.transformer import decode_groups

    small = ["S", "C", "H", "C", "H", "C", "H", "C"]
    assert decode_groups(small) == [(0,), (1, 2), (3, 4), (5, 6), (7,)]  # S, CH x3, C+tail: 4 blocks
    assert decode_groups(small[:4]) == [(0, 1), (2, 3)]  # a tie on blocks (4): fewer runs
    assert decode_groups(["S"]) == [(0,)]
    assert decode_groups(small, size=1) == [(i,) for i in range(8)]
    kinds = ["S", "S", "C", "H"] + ["C", "H"] * 19 + ["C"]  # the flash layout
    groups = decode_groups(kinds)
    assert [i for g in groups for i in g] == list(range(len(kinds)))
    assert max(map(len, groups)) == 2 and len(groups) == 22


def _greedy(model, prompt, steps, max_len=64):
    """Prefill `prompt` into a new cache, then `steps` greedy steps -> (tokens, logits)."""
    cache = model.new_cache(prompt.shape[0], max_len)
    with torch.no_grad():
        tok = model(prompt, cache=cache)[:, -1:].argmax(-1)
    return _decode_steps(model, cache, tok, steps)[:2]


def _decode_steps(model, cache, tok, steps):
    """`steps` greedy one-token steps on `cache` -> (tokens, logits [steps, B, vocab])."""
    out, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            lg = model(tok, cache=cache)[:, -1]
            logits.append(lg)
            tok = lg.argmax(-1, keepdim=True)
            out.append(tok[:, 0].tolist())
    return out, torch.stack(logits), tok


def test_compiled_decode_runs_groups_of_blocks():
    """Three block kinds, decoded as two compiled graphs ([sliding, CSA], [HCA] + the tail; dynamo
    tracing only): the greedy tokens and logits of eager, and both graphs actually ran."""
    model = _model(seed=2).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 19))

    eager, eager_logits = _greedy(model, prompt, 12)
    model.compile_blocks(backend="eager", fullgraph=True)  # fullgraph: a group has no break either
    assert [plan[0] for plan in model.__dict__["_decode_plan"]] == [(0, 1), (2,)]
    compiled, comp_logits = _greedy(model, prompt, 12)
    assert len(model.__dict__["_compiled_ok"]) == 2
    assert compiled == eager
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-5, atol=1e-6)


def test_compiled_decode_with_a_cache_shorter_than_an_entry():
    """A cache too short to hold one compressed entry (max_len < the HCA rate: a short one-shot
    generation) decodes compiled, without falling back to eager, and gives eager's logits (the
    compiled compressor step once indexed the empty entry table)."""
    model = _model(seed=3).eval()
    max_len = model.config.hca_compress_rate - 1
    prompt = torch.randint(0, model.config.vocab_size, (1, 3))

    def decode():
        cache = model.new_cache(1, max_len)
        with torch.no_grad():
            tok = model(prompt, cache=cache)[:, -1:].argmax(-1)
            logits = []
            for _ in range(max_len - prompt.shape[1]):
                logits.append(model(tok, cache=cache)[:, -1])
                tok = logits[-1].argmax(-1, keepdim=True)
        return torch.stack(logits)

    eager = decode()
    model.compile_blocks(backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compile-failure fallback warns: make it fail here
        compiled = decode()
    assert model.blocks_compiled and model.__dict__["_compiled_ok"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_steady_decode_steps_call_the_compiled_code_without_guards():
    """After a decode loop's first compiled step (guards checked), later steps with the same
    cache and state call the graphs' compiled code directly (model/dispatch.py): the same tokens
    and logits as eager, dynamo's entry points are not called again, and a new cache or another
    batch size goes through the guards once more."""
    from nanoseek.model import dispatch

    model = _model(seed=5).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 19))

    def run(steps=10):
        return _greedy(model, prompt, steps)

    eager, eager_logits = run()
    model.compile_blocks(backend="eager", fullgraph=True)
    steps = model.__dict__["_dispatch"]
    entered = []
    compiled_call = model._compiled_call
    model._compiled_call = lambda fn, *a: entered.append(fn) or compiled_call(fn, *a)
    tokens, logits = run()
    assert tokens == eager
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert (steps.guarded_steps, steps.direct_steps) == (1, 9)
    assert len(entered) == len(model.__dict__["_decode_plan"])  # dynamo's entries: first step only
    dispatch.enabled = False
    try:
        guarded, guarded_logits = run()
    finally:
        dispatch.enabled = True
    assert guarded == tokens and torch.equal(guarded_logits, logits)  # the same compiled graphs
    assert (steps.guarded_steps, steps.direct_steps) == (11, 9)
    run(3)  # a new cache: its first step is guarded
    assert (steps.guarded_steps, steps.direct_steps) == (12, 11)
    cache = model.new_cache(2, 64)  # batch 2 (a new graph), then its steady state
    _decode_steps(model, cache, torch.randint(0, model.config.vocab_size, (2, 1)), 3)
    assert (steps.guarded_steps, steps.direct_steps) == (13, 13)


def _to_bf16_in_place(cache):
    """The same cache object, its window rings and compressed entries replaced by bf16 copies."""
    for lc in cache.layers:
        lc.window = lc.window.bfloat16()
        for s in (lc.compressor, lc.indexer):
            if s is not None:
                s.entries = s.entries.bfloat16()


def test_decode_at_another_cache_length_returns_to_the_static_graphs():
    """Each `generate` sizes its cache to its prompt + new tokens. A second length makes dynamo add
    dynamic-shape graphs; both lengths decode as eager does, and a later loop at the first length
    calls its static graphs again (the direct calls take the oldest accepting entry, where dynamo
    would take the newest)."""
    model = _model(seed=7).eval()
    compiled = []

    def recording(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    prompt = torch.randint(0, model.config.vocab_size, (1, 9))

    def decode(max_len):
        return _greedy(model, prompt, 4, max_len)

    eager = {n: decode(n) for n in (40, 56)}
    model.compile_blocks(backend=recording)
    runs = [(n, decode(n)) for n in (40, 56, 40)]
    for n, got in runs:
        assert got[0] == eager[n][0]
        torch.testing.assert_close(got[1], eager[n][1], rtol=1e-5, atol=1e-6)
    static, dynamic = compiled[: len(compiled) // 2], compiled[len(compiled) // 2 :]
    assert static and len(dynamic) == len(static)  # the second length compiled every graph again
    learned = model.__dict__["_dispatch"]._learned.calls  # the last loop's direct calls (length 40)
    entries = [torch._dynamo.eval_frame._debug_get_cache_entry_list(raw.__code__)
               for _, _, _, _, raw in model.__dict__["_decode_plan"]]
    assert all(len(e) == 2 for e in entries)  # static (oldest) and dynamic (newest) per graph
    assert [f.__code__ for f in learned] == [e[-1].code for e in entries]


def test_steady_decode_steps_notice_casts_and_grad_mode():
    """The direct calls are dropped as soon as what dynamo's guards check changes under the same
    cache object: its tensors replaced by bf16 ones, the parameters cast to bf16 in place, a step
    recording gradients. The steps after each change give what an eager twin gives."""
    model = _model(seed=6).eval()
    twin = _model(seed=6).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 11))
    model.compile_blocks(backend="eager", fullgraph=True)
    steps = model.__dict__["_dispatch"]

    def both(tok, n, tol):
        a = _decode_steps(model, cache, tok, n)
        b = _decode_steps(twin, twin_cache, tok, n)
        assert a[0] == b[0]
        torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)
        return a[2]

    cache, twin_cache = model.new_cache(1, 64), twin.new_cache(1, 64)
    with torch.no_grad():
        tok = model(prompt, cache=cache)[:, -1:].argmax(-1)
        twin(prompt, cache=twin_cache)
    tok = both(tok, 3, 1e-6)
    assert (steps.guarded_steps, steps.direct_steps) == (1, 2)
    _to_bf16_in_place(cache), _to_bf16_in_place(twin_cache)
    tok = both(tok, 3, 1e-6)
    assert (steps.guarded_steps, steps.direct_steps) == (2, 4)
    model.bfloat16(), twin.bfloat16()  # in place: the same parameter objects, another dtype
    tok = both(tok, 3, 2e-2)  # bf16 (the graphs sum their products in another order)
    assert (steps.guarded_steps, steps.direct_steps) == (3, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # part of dynamo's global-state guard
    try:
        tok = both(tok, 2, 2e-2)
    finally:
        torch.set_num_threads(threads)
    assert (steps.guarded_steps, steps.direct_steps) == (4, 7)
    with torch.enable_grad():  # a step that records gradients always checks the guards
        model(tok, cache=cache)
    assert (steps.guarded_steps, steps.direct_steps) == (5, 7)


def test_compiled_code_for_finds_the_guarded_entry():
    """dispatch.compiled_code_for returns the code dynamo runs once its guards pass: none for
    arguments the guards reject, none for code that resumes after a graph break (it would run
    uncompiled), and for a break-free function a callable giving the function's result."""
    from nanoseek.model.dispatch import compiled_code_for

    def plain(x, y):
        return x * 2 + y

    def broken(x):
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2

    x, y = torch.arange(4.0), torch.ones(4)
    torch.compile(plain, backend="eager")(x, y)
    torch.compile(broken, backend="eager")(x)
    direct = compiled_code_for(plain, (x, y))
    assert direct is not None and direct is not plain
    x2, y2 = torch.randn(4), torch.randn(4)  # what the guards accept: other values, same metadata
    torch.testing.assert_close(direct(x2, y2), plain(x2, y2))
    assert compiled_code_for(plain, (x.double(), y)) is None  # the dtype guard fails
    assert compiled_code_for(plain, (x, x)) is None  # aliased inputs: another graph
    assert compiled_code_for(broken, (x,)) is None
    torch.compile(plain, backend="eager")(torch.ones(5), torch.ones(5))  # a second shape: a dynamic entry
    dynamic, static = torch._dynamo.eval_frame._debug_get_cache_entry_list(plain.__code__)  # newest first
    assert dynamic.guard_manager.check({"x": x, "y": y}) and static.guard_manager.check({"x": x, "y": y})
    assert compiled_code_for(plain, (x, y)).__code__ is static.code  # both accept (4,): the static one
    assert compiled_code_for(plain, (torch.ones(6), torch.ones(6))).__code__ is dynamic.code


def test_decode_graphs_hold_no_autocast_regions():
    """Without autocast, the fp32 regions (mHC, compressor, router, attention kernel) are not
    entered, so the decode graphs dynamo captures hold no autocast enter/exit calls: AOT
    autograd's on-disk cache refuses graphs with them, which re-traced every graph in each new
    process. Under autocast the regions still switch it off."""
    from nanoseek.model.precision import fp32_region

    model = _model(seed=4).eval()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model.compile_blocks(backend=capture)
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        tok = model(torch.randint(0, model.config.vocab_size, (1, 9)), cache=cache)[:, -1:].argmax(-1)
        for _ in range(3):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert graphs and len(targets) > 100  # the decode graphs were captured
    assert not [t for t in targets if "autocast" in t]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32_region("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")


def _fullgraph(fn):
    return torch.compile(fn, backend="eager", fullgraph=True)


def test_decode_block_is_one_graph():
    """Every block kind's one-token decode step (attention with cache writes, compressor and
    indexer state machines, mHC, gate, gathered experts) traces without a graph break."""
    model = _model().eval()
    cache = model.new_cache(2, 64)
    cache.pos[:] = torch.tensor([7, 12])  # rows at different positions, one closing a window
    tok = torch.randint(0, model.config.vocab_size, (2, 1))
    ctx = model._context(tok, cache)
    streams = model.embed(tok).unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            out = _fullgraph(lambda s, c, lc, layer=layer: layer(s, c, lc))(streams, ctx, cache.layers[i])
            assert out.shape == streams.shape and torch.isfinite(out).all()


def test_training_block_halves_are_one_graph_each():
    """In training mode (packed documents, balance and indexer terms collected) Block.front
    (attention incl. compressor, indexer scores / top-k / KL / recall, mHC, norms, routing and
    the load counter) and Block.back (shared expert, combine, mHC) trace without a graph break
    for every block kind and the MTP block; the grouped expert pass between them is the one
    documented eager piece."""
    model = _model()
    ids, doc = _packed_batch(model.config.vocab_size)
    ctx = model._context(ids, None, doc_ids=doc, collect_indexer=True, collect_balance=True)
    streams = model.embed(ids).unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
    front = _fullgraph(lambda block, *a: block.front(*a))
    back = _fullgraph(lambda block, *a: block.back(*a))
    for layer in model.layers:
        sub = ForwardContext(**{**ctx.__dict__, "aux": type(ctx.aux)()})
        *state, flat, w, idx = front(layer, streams, sub, None)
        out = back(layer, *state, flat, layer.ffn.experts(flat, idx, w))
        assert out.shape == streams.shape and torch.isfinite(out).all()
        assert len(sub.aux.balance) == (0 if layer.ffn.is_hash else 1)
        assert len(sub.aux.indexer) == (1 if layer.attn.indexer is not None else 0)
    mtp = model.mtp[0]
    sub = ForwardContext(**{**ctx.__dict__, "aux": type(ctx.aux)()})
    *state, flat, w, idx = front(mtp, streams, model.embed(ids), sub, None)
    new_streams, h = back(mtp, *state, flat, mtp.ffn.experts(flat, idx, w))
    assert new_streams.shape == streams.shape and h.shape == (*ids.shape, model.config.hidden_size)
