"""One request never hurts another: a failure inside one row of the batch (its sampling, its
callback) ends that request alone; the other rows finish with exactly their solo output, and the
engine's in_flight comes back to 0. Parameters that underflow (temperature / top_p = 1e-300) are
numerically safe."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import BatchRunner, SamplingParams, Sequence
from nanoseek.engine.engine import Engine, EngineError
from nanoseek.engine.sampling import SamplingError, check_logits, sample_row
from tests.engine.fixtures import make_model, make_tokenizer


@pytest.fixture(scope="module")
def mt():
    return make_model(), make_tokenizer()


def run_alone(model, tok, prompt, params):
    r = BatchRunner(model, 1, 64, vocab_limit=tok.vocab_size)
    s = Sequence(prompt, params, tokenizer=tok)
    r.add(s)
    while r.has_work():
        r.step()
    return s.tokens


@pytest.mark.parametrize("kw", [dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300),
                                dict(temperature=5e-324, top_k=3, top_p=1e-45)])
def test_underflowing_parameters_sample_the_argmax(kw):
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    for seed in range(5):
        g = SamplingParams(seed=seed, **kw).make_generator()
        assert sample_row(logits, SamplingParams(**kw), g)[0] == 1


def test_nan_logits_raise_a_sampling_error():
    with pytest.raises(SamplingError):
        sample_row(torch.tensor([0.0, float("nan")]), SamplingParams(temperature=1.0), None)
    with pytest.raises(SamplingError):
        sample_row(torch.full((3,), float("-inf")), SamplingParams(), None)


@pytest.mark.parametrize("values, ok", [
    ([0.0, 1.0, -2.0], True), ([float("-inf"), -3.0], True), ([float("inf"), 1.0], True),
    ([1.0, float("nan")], False), ([float("nan"), float("inf")], False), ([float("-inf")] * 3, False),
    ([float("inf")] * 3, False), ([float("inf"), float("-inf")], False), ([float("nan")] * 2, False)])
def test_check_logits_against_the_elementwise_rule(values, ok):
    """No NaN and at least one finite logit (the rule, spelled out with math on each value),
    whether check_logits takes the max itself or is given it; sample_row refuses the same rows
    (greedy or sampled) and picks the argmax of the others greedily."""
    import math

    assert ok == (not any(math.isnan(v) for v in values) and any(math.isfinite(v) for v in values))
    logits = torch.tensor(values)
    for top in (None, float(logits.max())):
        if ok:
            check_logits(logits, top)
            assert sample_row(logits, SamplingParams(), None, top=top)[0] == int(torch.argmax(logits))
            continue
        with pytest.raises(SamplingError, match="non-finite logits"):
            check_logits(logits, top)
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
            with pytest.raises(SamplingError, match="non-finite logits"):
                sample_row(logits, params, params.make_generator(), top=top)


def test_a_failing_row_leaves_alone_and_the_others_are_exact(mt):
    model, tok = mt
    prompts = [[tok.bos_id] + tok.encode(p) for p in ("def f(x):", "import os", "for i in")]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=7, stop_token_ids=(tok.eos_id,))
    solo = [run_alone(model, tok, p, params) for p in prompts]
    runner = BatchRunner(model, 4, 64, vocab_limit=tok.vocab_size)
    calls = {"n": 0}

    def poisoned(seq, delta):
        calls["n"] += 1
        if calls["n"] == 3 and delta.finish_reason is None:
            raise RuntimeError("boom")

    seqs = [Sequence(prompts[0], params, tokenizer=tok),
            Sequence(prompts[1], SamplingParams(max_new_tokens=12, temperature=1e-300), tokenizer=tok,
                     on_delta=poisoned),
            Sequence(prompts[1], params, tokenizer=tok), Sequence(prompts[2], params, tokenizer=tok)]
    for s in seqs:
        runner.add(s)
    while runner.has_work():
        runner.step()
    assert seqs[1].finish_reason == "error" and "boom" in seqs[1].error
    assert [s.tokens for s in (seqs[0], seqs[2], seqs[3])] == solo
    assert all(s.slot is None for s in seqs) and runner.slots == [None] * 4


def test_engine_in_flight_returns_to_zero_after_a_row_fails(mt, monkeypatch):
    model, tok = mt
    import nanoseek.engine.batch as batch

    real = batch.sample_row

    def flaky(logits, params, generator, lp_row=None, top=None):
        if params.top_k == 13:  # the poisoned request
            raise SamplingError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator, lp_row, top)

    monkeypatch.setattr(batch, "sample_row", flaky)
    ids = [tok.bos_id] + tok.encode("def add(a, b):")
    with Engine(model, tokenizer=tok, max_batch=4, max_len=64) as eng:
        good = [eng.submit(ids, SamplingParams(max_new_tokens=8, temperature=0.5, seed=i)) for i in range(3)]
        bad = eng.submit(ids, SamplingParams(max_new_tokens=8, temperature=0.5, top_k=13))
        with pytest.raises(EngineError, match="probability tensor"):
            list(bad)
        for s in good:
            assert list(s)[-1].finish_reason in ("length", "stop")
        assert eng.stats()["in_flight"] == 0 and eng.stats()["active"] == 0
        again = eng.submit(ids, SamplingParams(max_new_tokens=4))
        assert list(again)[-1].finish_reason in ("length", "stop")
