"""Continuous batching: requests joining/leaving a fixed set of slots give the same tokens as
generating each alone; cancellation frees the slot; async consumption works."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nanoseek.engine import Engine, SamplingParams, generate
from tests.engine.test_generate import prompt


@pytest.mark.parametrize("slots", [2, 4])
def test_more_requests_than_slots_equal_each_alone(model, slots):
    ps = [prompt(n, 30 + i) for i, n in enumerate((3, 20, 7, 33, 12, 5))]
    news = [9, 3, 12, 5, 7, 4]  # different lengths: requests leave at different steps, others join
    with Engine(model, max_batch=slots, max_len=64, chunk_size=8) as eng:
        streams = [eng.submit(p, SamplingParams(max_new_tokens=k)) for p, k in zip(ps, news)]
        outs = []
        for s in streams:
            deltas = list(s)
            assert deltas[-1].finish_reason == "length"
            outs.append([t for d in deltas for t in d.tokens])
        stats = eng.stats()
    for p, k, o in zip(ps, news, outs):
        assert o == generate(model, p, k, stop_on_eos=False)
    assert stats["in_flight"] == 0 and stats["active"] == 0
    assert stats["cache_bytes"] == eng.runner.cache.nbytes() + eng.runner.scratch.nbytes() > 0


def test_per_request_params_and_seeds(model):
    p = prompt(10, 40)
    with Engine(model, max_batch=4, max_len=64) as eng:
        a = eng.submit(p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=5))
        b = eng.submit(p, SamplingParams(max_new_tokens=8))
        c = eng.submit(p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=5))
        ra, rb, rc = ([t for d in s for t in d.tokens] for s in (a, b, c))
    assert ra == rc == generate(model, p, 8, temperature=1.0, seed=5, stop_on_eos=False)
    assert rb == generate(model, p, 8, stop_on_eos=False)


def test_cancel_frees_slot_others_continue(model):
    p = prompt(10, 41)
    with Engine(model, max_batch=1, max_len=600) as eng:
        long = eng.submit(p, SamplingParams(max_new_tokens=500))
        queued = eng.submit(p, SamplingParams(max_new_tokens=4))  # waits for the only slot
        first = long.get(timeout=60)
        assert first.finish_reason is None
        long.cancel()
        rest = list(long)
        assert rest[-1].finish_reason == "cancelled"
        n = len(first.tokens) + sum(len(d.tokens) for d in rest)
        assert n < 500
        out = [t for d in queued for t in d.tokens]
    assert out == generate(model, p, 4, stop_on_eos=False)


def test_async_stream_and_submit_from_threads(model):
    p = prompt(6, 42)
    want = generate(model, p, 5, stop_on_eos=False)

    async def consume(eng):
        loop = asyncio.get_running_loop()
        streams = [eng.submit(p, SamplingParams(max_new_tokens=5), loop=loop) for _ in range(3)]

        async def one(s):
            return [t async for d in s for t in d.tokens]

        return await asyncio.gather(*(one(s) for s in streams))

    with Engine(model, max_batch=2, max_len=32) as eng:
        assert asyncio.run(consume(eng)) == [want] * 3
        results = [None] * 4

        def worker(i):
            results[i] = [t for d in eng.submit(p, SamplingParams(max_new_tokens=5)) for t in d.tokens]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == [want] * 4


def test_rejects_prompt_that_cannot_fit(model):
    with Engine(model, max_batch=1, max_len=8) as eng:
        with pytest.raises(ValueError, match="at most 7"):
            eng.submit(list(range(8)), SamplingParams(max_new_tokens=1))
    with pytest.raises(RuntimeError):
        eng.submit([0], SamplingParams(max_new_tokens=1))  # stopped


def test_warm_up_compiles_what_requests_would_then_forgets_them(model):
    """Engine.warm_up (what `serve` runs before opening its port) runs the compiled decode step
    at batch 1 and batch 2: requests afterwards, alone or together, compile nothing more, give
    eager's tokens, and the statistics start from zero. An eager model has nothing to warm."""
    import torch
    from torch._dynamo.utils import counters

    from tests.engine.fixtures import make_model

    assert Engine(model, max_batch=4, max_len=64).warm_up() == 0
    ps = [prompt(n, 60 + i) for i, n in enumerate((5, 11, 8))]
    want = [generate(model, p, 6, stop_on_eos=False) for p in ps]
    torch._dynamo.reset()
    compiled = make_model(0).compile_blocks(backend="eager", decode_only=True)
    try:
        eng = Engine(compiled, max_batch=4, max_len=64)
        counters.clear()
        assert eng.warm_up() >= 4  # two steps alone, two together
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        stats = eng.stats()
        assert stats["decode_steps"] == stats["decoded_tokens"] == 0 and eng.runner._prefix is None
        with eng:
            with pytest.raises(RuntimeError):
                eng.warm_up()
            alone = [t for d in eng.submit(ps[0], SamplingParams(max_new_tokens=6)) for t in d.tokens]
            streams = [eng.submit(p, SamplingParams(max_new_tokens=6)) for p in ps[1:]]
            together = [[t for d in s for t in d.tokens] for s in streams]
        assert [alone, *together] == want
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for the requests
    finally:
        torch._dynamo.reset()


def test_caches_that_cannot_fit_are_refused_together_before_allocating(model, monkeypatch):
    """The batch cache and the prefill's scratch cache are checked as one sum against the free
    memory: each alone fits here, both do not, and neither is allocated."""
    from nanoseek.engine.batch import BatchRunner
    from nanoseek.model import cache as cache_module

    one = model.new_cache(1, 20_000).nbytes()
    batch = model.new_cache(2, 20_000).nbytes()
    monkeypatch.setattr(cache_module, "CHECK_BYTES", 1 << 20)
    monkeypatch.setattr(cache_module, "available_memory", lambda device: batch + one - 1)
    real = cache_module.DecodeCache.allocate.__func__
    allocated = []
    monkeypatch.setattr(cache_module.DecodeCache, "allocate",
                        classmethod(lambda cls, *a, **k: allocated.append(a) or real(cls, *a, **k)))
    with pytest.raises(ValueError, match=r"decode cache for 2 row\(s\) of up to 20,000 tokens \(with the prefill's\) "
                                         r"needs .* MiB, more than the .* MiB of memory available"):
        BatchRunner(model, 2, 20_000)
    assert allocated == []
    monkeypatch.setattr(cache_module, "available_memory", lambda device: 2 * (batch + one))
    assert BatchRunner(model, 2, 20_000).nbytes() == batch + one
