"""generate / generate_stream / FIM against independent oracles (full uncached forwards)."""

from __future__ import annotations

import pytest
import torch

from nanoseek import generate, generate_stream
from nanoseek.engine import fill_in_middle, fim_prompt, generate_full
from nanoseek.engine.sampling import draw, filter_logits, nucleus

# Prompt lengths straddle the tiny preset's sliding window (16) and compression rates (4, 8).
LENGTHS = (3, 11, 29)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(32, 1024, (n - 1,), generator=g).tolist()


@torch.no_grad()
def oracle_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Argmax of a full uncached forward over the whole sequence, one token at a time."""
    ids, out, lps = list(ids), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        t = int(logits.argmax())
        out.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        ids.append(t)
    return out, lps


def test_greedy_matches_uncached_argmax_and_logprobs(model):
    for i, n in enumerate(LENGTHS):
        p = prompt(n, i)
        want, want_lp = oracle_greedy(model, p, 12)
        got, lp = generate(model, p, 12, stop_on_eos=False, logprobs=True, chunk_size=8)  # chunked prefill
        assert got == want
        assert lp == pytest.approx(want_lp, abs=1e-4)


def test_batched_ragged_prompts_equal_each_alone(model):
    ps = [prompt(n, 10 + i) for i, n in enumerate(LENGTHS)]
    batched = generate(model, ps, 10, stop_on_eos=False)
    assert isinstance(batched, list) and len(batched) == len(ps)
    for p, b in zip(ps, batched):
        assert b == generate(model, p, 10, stop_on_eos=False)
    # Sampling too: row i uses seed + i, whatever else is in the batch.
    sampled = generate(model, ps, 10, temperature=1.0, seed=7, stop_on_eos=False)
    for i, p in enumerate(ps):
        assert sampled[i] == generate(model, p, 10, temperature=1.0, seed=7 + i, stop_on_eos=False)


def test_tensor_input_shapes(model):
    p = prompt(9, 3)
    one = generate(model, torch.tensor(p), 5, stop_on_eos=False)
    two = generate(model, torch.tensor([p, p]), 5, stop_on_eos=False)
    assert two == [one, one]
    with pytest.raises(ValueError):
        generate(model, [], 5)


def test_seeded_sampling_reproducible(model):
    p = prompt(11, 4)
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, stop_on_eos=False)
    a = generate(model, p, 16, seed=123, **kw)
    b = generate(model, p, 16, seed=123, **kw)
    c = generate(model, p, 16, seed=124, **kw)
    assert a == b
    assert a != c
    assert len(a) == 16


def test_degenerate_sampling_equals_greedy(model):
    p = prompt(11, 5)
    greedy = generate(model, p, 8, stop_on_eos=False)
    assert generate(model, p, 8, temperature=0.7, top_k=1, seed=1, stop_on_eos=False) == greedy
    assert generate(model, p, 8, temperature=0.7, top_p=1e-6, seed=2, stop_on_eos=False) == greedy


def test_filter_logits():
    x = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    k2 = filter_logits(x, 1.0, top_k=2)
    assert torch.isfinite(k2).tolist() == [False, True, True, False, False]
    probs = torch.softmax(x, -1)  # sorted: 3.0 (.64), 2.0 (.24), 1.0 (.09), ...
    keep = torch.isfinite(filter_logits(x, 1.0, top_p=float(probs[1] + 0.01))).tolist()
    assert keep == [False, True, True, False, False]  # .64 < p, .64+.24 >= p -> two tokens
    assert torch.isfinite(filter_logits(x, 1.0, top_p=0.5)).sum() == 1
    assert torch.allclose(filter_logits(x, 2.0), x / 2)


def _nucleus_float64(x: torch.Tensor, top_p: float):
    """The top-p rule by brute force in float64 over a full sort: (kept mask, mass before each)."""
    xd = x.double()
    order = torch.sort(xd, descending=True).indices
    probs = torch.softmax(xd[order], -1)
    before = torch.empty_like(xd)
    before[order] = torch.cumsum(probs, -1) - probs
    keep = before < top_p
    keep[order[0]] = True
    return keep, before


@pytest.mark.parametrize("vocab", [5, 64, 300, 8192, 129280])
def test_nucleus_matches_a_float64_sort(vocab):
    """sampling.nucleus (top-k candidates, growing) keeps what the float64 rule keeps, except
    tokens whose mass-before is within 1e-6 of top_p (float32 logits cannot decide those), over peaked
    and flat rows, huge logits (~100: a softmax-exact total matters there), -inf entries, and
    top_p from 1e-300 to 0.999; kept logits are unchanged, the rest -inf."""
    g = torch.Generator().manual_seed(vocab)
    undecided = 0
    for scale in (0.01, 1.0, 3.0, 10.0, 50.0):
        for masked in (False, True):
            x = torch.randn(vocab, generator=g) * scale
            if masked:
                x[torch.randint(0, vocab, (vocab // 3 + 1,), generator=g)] = float("-inf")
                x[0] = 1.0
            for top_p in (1e-300, 0.1, 0.5, 0.9, 0.95, 0.999):
                out = nucleus(x, top_p)
                kept = torch.isfinite(out)
                torch.testing.assert_close(out[kept], x[kept], rtol=0, atol=0)
                want, before = _nucleus_float64(x, top_p)
                differ = kept != want
                assert ((before[differ] - top_p).abs() < 1e-6).all(), (scale, masked, top_p, int(differ.sum()))
                undecided += int(differ.sum())
    assert undecided <= 2
    # logits far from 0 (the softmax does not change): differences to the max keep the mass exact
    # where exp(x - logsumexp(x)) lost ~1e-3 of it to the rounding of logsumexp and kept every
    # token. (Rounded to float32 near 1e4 many logits tie, and which of a tied group straddling
    # the cut stays is arbitrary: the number kept is what the rule fixes.)
    x = torch.randn(vocab, generator=g) * 3 + 1e4
    for top_p in (0.5, 0.9, 0.99):
        want, _ = _nucleus_float64(x, top_p)
        assert abs(int(torch.isfinite(nucleus(x, top_p)).sum()) - int(want.sum())) <= 1, top_p


def test_draw_follows_the_weights():
    """sampling.draw (the exponential race, with -log of uniform draws): frequencies of 60,000 draws within 5
    standard deviations of the weights (unnormalised, with zeros and a tiny weight), never an
    index of zero weight, the same draws for the same seed, and a clear error for weights that
    cannot be drawn from. At V4's 129,280 entries, the head of a Zipf distribution too."""
    w = torch.tensor([0.0, 5.0, 0.0, 2.0, 3.0, 1e-3, 0.0, 7.0])
    g = torch.Generator().manual_seed(0)
    n = 60_000
    counts = torch.bincount(torch.tensor([draw(w, g) for _ in range(n)]), minlength=len(w)).double()
    p = w.double() / w.sum()
    assert counts[w == 0].sum() == 0
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1).all(), (counts, n * p)
    seq = [draw(w, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert seq == [draw(w, torch.Generator().manual_seed(3)) for _ in range(3)]
    for bad in (torch.zeros(4), torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")])):
        with pytest.raises(ValueError, match="positive sum"):
            draw(bad, g)
    zipf = 1.0 / torch.arange(1, 129_281, dtype=torch.float64) ** 1.2
    probs = (zipf / zipf.sum()).float()
    got = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20_000)]), minlength=5)[:5].double()
    want = 20_000 * probs[:5].double()
    assert ((got - want).abs() <= 5 * (want * (1 - want / 20_000)).sqrt() + 1).all(), (got, want)


def test_logprobs_modes():
    """"model" (the default, OpenAI's meaning): the raw distribution; "sampled": the one the token
    was drawn from -- after temperature and cuts, a point mass for a greedy pick, the raw one
    again under the default sampling."""
    from nanoseek.engine.sampling import SamplingParams, token_logprobs

    x = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    raw = torch.log_softmax(x, -1)
    for kw in (dict(temperature=0.5), dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.9), {}):
        model = token_logprobs(x, 2, SamplingParams(logprobs=True, **kw))[0]
        sampled = token_logprobs(x, 2, SamplingParams(logprobs=True, logprobs_mode="sampled", **kw))[0]
        assert model == pytest.approx(float(raw[2]))
        if kw.get("temperature", 0.0) == 0.0:   # greedy: the argmax had probability 1
            assert sampled == 0.0 and token_logprobs(x, 1, SamplingParams(logprobs=True, logprobs_mode="sampled"))[0] == 0.0
        else:
            want = torch.log_softmax(filter_logits(x, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0)), -1)
            assert sampled == pytest.approx(float(want[2])) and sampled != pytest.approx(model)
    plain = SamplingParams(logprobs=True, temperature=1.0, logprobs_mode="sampled")
    assert token_logprobs(x, 2, plain)[0] == pytest.approx(float(raw[2]), abs=0)
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplingParams(logprobs_mode="processed")


def test_stop_token_ids(model):
    p = prompt(11, 6)
    full = generate(model, p, 12, stop_on_eos=False)
    stop_tok = full[5]
    k = full.index(stop_tok)
    res = generate_full(model, p, 12, stop=[stop_tok], stop_on_eos=False)[0]
    assert res.tokens == full[:k]
    assert res.finish_reason == "stop"
    assert generate_full(model, p, 12, stop_on_eos=False)[0].finish_reason == "length"


def test_stop_strings_cut_text_and_tokens(model, tok):
    p = [tok.bos_id] + tok.encode("def fib(n):\n")
    full = generate_full(model, p, 24, tokenizer=tok, stop_on_eos=False)[0]
    text = full.text
    assert text == tok.decode(full.tokens)
    # A stop string that starts in the middle of the text (spanning whatever token boundary).
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.find(stop)
    res = generate_full(model, p, 24, stop=[stop, "\x00never"], tokenizer=tok, stop_on_eos=False)[0]
    assert res.finish_reason == "stop"
    assert res.text == text[:cut]
    kept = tok.decode(res.tokens)
    assert text[:cut].startswith(kept) and res.tokens == full.tokens[:len(res.tokens)]
    # exactly the tokens whose text lies entirely before the match are kept
    assert len(tok.decode(full.tokens[:len(res.tokens) + 1])) > cut
    # streaming never shows text that the final answer drops
    streamed = "".join(ev.text for ev in generate_stream(model, p, 24, stop=[stop], tokenizer=tok,
                                                         stop_on_eos=False))
    assert streamed == text[:cut]
    with pytest.raises(ValueError):
        generate(model, p, 4, stop=["x"])  # stop strings need a tokenizer


def test_stream_matches_generate(model, tok):
    ps = [prompt(n, 20 + i) for i, n in enumerate(LENGTHS)]
    want = generate_full(model, ps, 9, tokenizer=tok, logprobs=True, stop_on_eos=False)
    got = {i: [] for i in range(len(ps))}
    text = {i: "" for i in range(len(ps))}
    ends = {}
    for ev in generate_stream(model, ps, 9, tokenizer=tok, stop_on_eos=False):
        assert ev.index not in ends, "no event after a row's final one"
        got[ev.index] += ev.tokens
        text[ev.index] += ev.text
        if ev.finish_reason:
            ends[ev.index] = ev.finish_reason
    for i, w in enumerate(want):
        assert got[i] == w.tokens and text[i] == w.text and ends[i] == "length"
        assert len(w.logprobs) == len(w.tokens)
    assert want[0].cache_bytes > 0


def test_eos_stops_by_default(model):
    p = prompt(11, 8)
    full = generate(model, p, 6, stop_on_eos=False)
    eos = model.config.eos_token_id
    k = full.index(eos) if eos in full else None
    got = generate(model, p, 6)
    assert got == (full[:k] if k is not None else full)
    assert eos not in got


def test_cache_capacity_finishes_with_length(model):
    p = prompt(11, 9)
    res = generate_full(model, p, 50, max_len=16, stop_on_eos=False)[0]
    assert res.finish_reason == "length" and len(res.tokens) == 16 - 11 + 1
    assert res.tokens == generate(model, p, 6, stop_on_eos=False)


def test_fim_prompt_layout_and_middle(model, tok):
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    ids = fim_prompt(tok, prefix, suffix)
    assert ids == ([tok.bos_id, tok.fim_begin_id] + tok.encode(prefix) + [tok.fim_hole_id] + tok.encode(suffix)
                   + [tok.fim_end_id])
    from nanoseek.data.tokenizer import FIM_LAYOUTS
    want = (FIM_LAYOUTS["psm"].replace("<BOS>", tok.decode([tok.bos_id])).replace("{middle}<EOS>", "")
            .format(prefix=prefix, suffix=suffix))
    assert tok.decode(ids) == want
    # special strings inside the code are plain text, not FIM control tokens
    assert tok.fim_hole_id not in fim_prompt(tok, "<｜fim▁hole｜>", "")[2:-2]
    middle = fill_in_middle(model, tok, prefix, suffix, max_new_tokens=8)
    assert middle == tok.decode(generate(model, ids, 8, tokenizer=tok))


def test_compiled_engine_equals_eager(model):
    """generate(compile=True) decodes through the compiled one-token block graphs
    (Transformer.compile_blocks) on the batch runner's cache-row views; tokens and log-probs equal
    the eager engine's. The model is compiled beforehand with the cheap aot_eager backend (the
    engine keeps an already-compiled model as it is), a fresh copy so other tests stay eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tests.engine.fixtures import make_model

    ps = [prompt(n, 40 + i) for i, n in enumerate(LENGTHS)]
    eager = generate_full(model, ps, 10, stop_on_eos=False, logprobs=True)
    torch._dynamo.reset()
    counters.clear()
    compiled_model = make_model(0).compile_blocks(backend="aot_eager")
    got = generate_full(compiled_model, ps, 10, stop_on_eos=False, logprobs=True, compile=True)
    assert counters["stats"]["unique_graphs"] > 0  # the decode steps really ran compiled graphs
    for e, g in zip(eager, got):
        assert g.tokens == e.tokens
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)
    torch._dynamo.reset()


def test_repeated_prompts_reuse_the_prefill_exactly(model):
    """n samples of one prompt (GRPO groups): only the first is prefilled, the others start from
    the kept scratch state and logits -- and every row is what it would be alone."""
    from nanoseek.engine.batch import BatchRunner, Sequence
    from nanoseek.engine.sampling import SamplingParams

    p, q = prompt(29, 20), prompt(11, 21)
    rows = [p, p, p, q, q, p]
    runner = BatchRunner(model, 3, 64, chunk_size=8)        # fewer slots than rows: queued rows join later
    seqs = []
    for i, r in enumerate(rows):
        s = Sequence(r, SamplingParams(max_new_tokens=9, temperature=1.0, seed=40 + i, logprobs=True))
        runner.add(s)
        seqs.append(s)
    while runner.has_work():
        runner.step()
    assert runner.prefill_reused == 3                      # rows 1, 2 (p) and 4 (q); row 5 follows q
    for i, (r, s) in enumerate(zip(rows, seqs)):
        alone, lps = generate(model, r, 9, temperature=1.0, seed=40 + i, stop_on_eos=False, logprobs=True)
        assert s.tokens == alone
        assert s.logprobs == pytest.approx(lps, abs=1e-5)


def test_a_call_past_the_models_positions_warns(model):
    import warnings

    from nanoseek.engine import generate

    limit = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"reach position {limit + 3:,}, past the model's max_position_embeddings={limit}"):
        generate(model, [1, 2, 3], limit, stop_on_eos=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, [1, 2, 3], 4, stop_on_eos=False)
