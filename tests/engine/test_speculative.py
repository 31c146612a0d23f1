"""MTP speculative decoding: greedy output equals plain greedy decoding token for token (also in
the continuous-batching engine, across switches between speculative rounds and batched plain
steps, with the MTP cache checked against a fresh oracle); sampled output has the distribution
of plain sampling (speculative sampling, chi-square tests against exact probabilities)."""

import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import Engine, SamplingParams, generate, generate_full
from nanoseek.engine import batch as batch_mod
from nanoseek.engine.batch import BatchRunner, Sequence
from nanoseek.engine.generate import speculative_generate
from nanoseek.engine.speculative import accept_sampled, sampling_probs


def model_with_predictable_mtp():
    """A random tiny model: its MTP drafts are mostly rejected, which exercises the rollback;
    the second test forces perfect drafts to exercise acceptance."""
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", index_topk=3)).eval()


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.999 quantile of chi-square(df) (Wilson-Hilferty; z = the normal 0.999 quantile)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting < 5 draws are pooled; a draw
    of a probability-0 token gives an infinite statistic."""
    n = float(counts.sum())
    exp = probs.double() * n
    small = exp < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([exp[~small], exp[small].sum().reshape(1)])
    keep = exp > 0
    if float(obs[~keep].sum()) > 0:
        return math.inf, int(keep.sum()) - 1
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_equals_plain_greedy(num_draft):
    model = model_with_predictable_mtp()
    g = torch.Generator().manual_seed(1)
    for plen in (1, 40):
        prompt = torch.randint(2, 1024, (plen,), generator=g).tolist()
        plain = generate(model, prompt, 24, stop_on_eos=False)
        spec, stats = speculative_generate(model, prompt, 24, num_draft=num_draft, stop_ids=())
        assert spec == plain
        assert stats.generated == 24 and stats.drafted > 0
        assert 0.0 <= stats.acceptance_rate <= 1.0
        if num_draft == 1:  # a [1, S] tensor prompt, as model calls take, gives the same tokens
            assert speculative_generate(model, torch.tensor([prompt]), 24, num_draft=1, stop_ids=())[0] == plain


def test_accepted_drafts_keep_the_output_exact():
    """Force acceptance: make the MTP head predict what the main model predicts by sharing the
    decision (the MTP logits are replaced by the main model's own next-next prediction)."""
    model = model_with_predictable_mtp()
    prompt = list(range(5, 25))
    plain = generate(model, prompt, 24, stop_on_eos=False)
    oracle = prompt + plain  # the true greedy continuation

    real = model.mtp_forward

    def perfect_drafter(streams, next_ids, cache=None, depth=0):
        logits, h = real(streams, next_ids, cache=cache, depth=depth)
        # position of the token this call predicts: mtp position + 2
        pos = int(cache.mtp_pos[0][0]) + 1  # after the call, the last consumed mtp position + 1
        target = oracle[pos] if pos < len(oracle) else 0
        forced = torch.full_like(logits, -1e9)
        forced[..., -1, target] = 0.0
        return forced, h

    model.mtp_forward = perfect_drafter
    spec, stats = speculative_generate(model, prompt, 24, num_draft=3, stop_ids=())
    assert spec == plain
    assert stats.acceptance_rate > 0.9 and stats.tokens_per_call > 3


def test_acceptance_rule_gives_the_target_distribution():
    """accept_sampled alone, with fixed target logits p_1..p_3 (processed by top-k) and draft
    distributions q_1, q_2 far from them: each emitted position is distributed as p_i."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.7, top_k=5)
    main = torch.randn(3, 6, generator=g) * 1.5
    q = [torch.softmax(torch.randn(6, generator=g) * 1.5, -1) for _ in range(2)]
    p = [sampling_probs(main[i], params) for i in range(3)]
    assert 0.5 * float((p[0] - q[0]).abs().sum()) > 0.3  # outputting drafts would be detected
    counts = torch.zeros(3, 6)
    drafted0 = torch.zeros(6)
    accepted = 0
    for _ in range(4000):
        drafts = [int(torch.multinomial(qi, 1, generator=g)) for qi in q]
        drafted0[drafts[0]] += 1
        a, out = accept_sampled(main, q, drafts, params, g)
        assert out[:a] == drafts[:a] and len(out) == a + 1
        accepted += a
        for i, t in enumerate(out):
            counts[i, t] += 1
    assert 0.1 < accepted / 8000 < 0.9  # both acceptance and rejection happen
    for i in range(3):
        stat, df = chi2_stat(counts[i], p[i])
        assert stat < chi2_critical(df), (i, stat, counts[i], p[i])
    stat, df = chi2_stat(drafted0, p[0])  # the test's power: the draft distribution fails it
    assert stat > 10 * chi2_critical(df)


def test_sampled_speculative_matches_plain_sampling_distribution():
    """End to end on a one-layer model with an 8-token vocabulary (2 Sinkhorn iterations, for speed): the first three tokens of
    many seeded speculative runs (2 drafts; ~half accepted) follow the exact distribution of plain
    sampling, computed from uncached forwards over every context."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=1, layer_types=["sliding_attention"],
                                  mlp_layer_types=["moe"], vocab_size=8, hc_sinkhorn_iters=2)
    model = Transformer(cfg).eval()
    model.reset_parameters(seed=0)
    with torch.no_grad():
        model.head.weight.mul_(4)  # peaked enough that p and the MTP's q differ
    prompt, V, N = [5, 3, 7], 8, 150
    kw = dict(temperature=1.0, top_p=0.95)
    runner = BatchRunner(model, 1, 16, speculative_tokens=2)
    seqs = [Sequence(prompt, SamplingParams(max_new_tokens=4, seed=1000 + i, **kw)) for i in range(N)]
    for s in seqs:  # queued: each runs alone, so every decode step is a speculative round
        runner.add(s)
    while runner.has_work():
        runner.step()
    st = runner.spec_stats
    assert 0.2 < st.acceptance_rate < 0.8 and st.rounds >= N
    outs = torch.tensor([s.tokens for s in seqs])
    params = SamplingParams(**kw)
    with torch.no_grad():
        def dists(ctxs):
            return torch.stack([sampling_probs(r, params) for r in model(torch.tensor(ctxs))[:, -1]])

        p1 = dists([prompt])[0]
        p2 = dists([prompt + [a] for a in range(V)])  # [a, b]
        p3 = dists([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    joint12 = p1[:, None] * p2
    exact = [p1, joint12.sum(0), (joint12[:, :, None] * p3).sum((0, 1))]
    for pos in range(3):
        stat, df = chi2_stat(torch.bincount(outs[:, pos], minlength=V), exact[pos])
        assert stat < chi2_critical(df), (pos, stat)
    # seeded runs are reproducible
    again = speculative_generate(model, prompt, 4, num_draft=2, stop_ids=(), seed=1000, **kw)[0]
    assert again == seqs[0].tokens


def test_engine_switches_between_speculative_and_batched_steps(model):
    """Three requests, two slots: the long one decodes alone (speculative rounds), then batched
    with a short one that finishes early (plain steps), then with a third that joins late, then
    alone again. Outputs equal plain greedy decoding, and at every speculative round the MTP
    cache and streams equal those of a fresh batch-1 oracle over the same tokens."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (9, 4, 20)]
    news = [40, 5, 8]
    want = [generate(model, p, n, stop_on_eos=False) for p, n in zip(ps, news)]
    checks = []
    real_round = batch_mod.spec_round

    def spying_round(m, cache, last_h, tok, k, params, gen, mask, pending):
        mp = int(cache.mtp_pos[0][0])
        ring = cache.mtp_layers[0].window[0]
        idx = torch.arange(max(0, mp - model.config.sliding_window), mp)
        queued = (torch.cat([p[0] for p in pending], 1) if pending else None, [t for p in pending for t in p[1]])
        checks.append((mp, tok, ring[idx % ring.shape[0]].clone(), last_h.clone(), queued))
        return real_round(m, cache, last_h, tok, k, params, gen, mask, pending)

    batch_mod.spec_round = spying_round
    try:
        with Engine(model, max_batch=2, max_len=80, speculative_tokens=2) as eng:
            long = eng.submit(ps[0], SamplingParams(max_new_tokens=news[0]))
            first = long.get(timeout=60)  # the long request is decoding before the others arrive
            rest = [eng.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps[1:], news[1:])]
            outs = [first.tokens + [t for d in long for t in d.tokens]]
            outs += [[t for d in s for t in d.tokens] for s in rest]
            stats = eng.stats()
    finally:
        batch_mod.spec_round = real_round
    assert outs == want
    spec = stats["speculative"]
    assert spec["rounds"] > 0 and stats["decode_steps"] > spec["rounds"]  # both kinds of step ran
    assert spec["drafted"] >= spec["rounds"] and 0 <= spec["acceptance_rate"] <= 1
    assert stats["decoded_tokens"] == sum(len(w) for w in want) - 3  # first tokens come from prefill
    # at each round on the long request: the MTP ring (positions < mtp_pos), the queued pairs
    # (true streams H_t, token t+1) and last_h equal a fresh batch-1 oracle over the same tokens
    full = ps[0] + want[0]
    checked = queued_checked = 0
    for mp, tok, ring, last_h, (qh, qt) in checks:
        P = mp + len(qt) + 1  # position of `tok`
        if P >= len(full) or tok != full[P]:
            continue  # a round on another request
        c = model.new_cache(1, 80, with_mtp=True)
        with torch.no_grad():
            _, streams = model(torch.tensor([full[:P]]), cache=c, return_streams=True)
            if mp:
                model.mtp_forward(streams[:, :mp], torch.tensor([full[1 : mp + 1]]), cache=c)
        idx = torch.arange(max(0, mp - model.config.sliding_window), mp)
        ref = c.mtp_layers[0].window[0][idx % c.mtp_layers[0].window.shape[1]]
        assert torch.allclose(ring, ref, atol=1e-4), mp
        assert torch.allclose(last_h, streams[:, P - 1 : P], atol=1e-4), mp
        if qt:
            assert qt == full[mp + 1 : P] and torch.allclose(qh, streams[:, mp : P - 1], atol=1e-4)
            queued_checked += 1
        checked += 1
    assert queued_checked >= 1
    assert checked >= 3


def test_speculative_honours_stops_logprobs_and_seeds(model, tok):
    g = torch.Generator().manual_seed(4)
    p = torch.randint(2, 300, (7,), generator=g).tolist()
    plain = generate_full(model, p, 16, logprobs=True, top_logprobs=2, stop_on_eos=False)[0]
    spec = generate_full(model, p, 16, logprobs=True, top_logprobs=2, stop_on_eos=False, speculative_tokens=3)[0]
    assert spec.tokens == plain.tokens and spec.spec_rounds > 0
    assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    assert [[t for t, _ in r] for r in spec.top_logprobs] == [[t for t, _ in r] for r in plain.top_logprobs]
    # a stop id in the middle of a round ends the output right there
    stop_id = plain.tokens[6]
    cut = plain.tokens[: plain.tokens.index(stop_id)]
    assert generate(model, p, 16, stop=[stop_id], stop_on_eos=False, speculative_tokens=3) == cut
    # stop strings (tokenizer text)
    pt = [tok.bos_id] + tok.encode("def add(a, b):\n")
    ref = generate_full(model, pt, 12, tokenizer=tok)[0]
    if len(ref.text) > 4:
        s = ref.text[2:4]
        a = generate_full(model, pt, 12, tokenizer=tok, stop=[s])[0]
        b = generate_full(model, pt, 12, tokenizer=tok, stop=[s], speculative_tokens=2)[0]
        assert (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason)
    # max_new_tokens is exact; seeded sampling is reproducible
    for n in (1, 3):
        assert len(generate(model, p, n, stop_on_eos=False, speculative_tokens=3)) == n
    kw = dict(temperature=0.9, top_k=20, seed=11, stop_on_eos=False, speculative_tokens=2)
    assert generate(model, p, 10, **kw) == generate(model, p, 10, **kw)


def test_engine_cache_capacity_and_errors(model):
    p = list(range(3, 10))
    # the cache fills up mid-round: fewer drafts near the end, output as plain, finish "length"
    with Engine(model, max_batch=1, max_len=14, speculative_tokens=3) as eng:
        out = [t for d in eng.submit(p, SamplingParams(max_new_tokens=20)) for t in d.tokens]
    assert out == generate(model, p, 20, stop_on_eos=False, max_len=14)
    with pytest.raises(ValueError, match="speculative_tokens"):
        BatchRunner(model, 1, 16, speculative_tokens=-1)
    torch.manual_seed(0)
    no_mtp = Transformer(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0, mtp_layer_types=[]))
    with pytest.raises(ValueError, match="MTP"):
        Engine(no_mtp, speculative_tokens=2)
