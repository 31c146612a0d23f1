"""Loss math of RL (GRPO family) and multi-teacher on-policy distillation
(nanoseek/train/objectives.py): reverse KL against float64 brute force, the mixture form, the
sampled-token estimator's expectation, and GRPO / Dr. GRPO / DAPO losses against numbers
worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.train.objectives import (group_advantages, grpo_loss, k3_kl, overlong_filter_mask, overlong_penalty,
                                       reverse_kl, sampled_reverse_kl_loss, step_share, teacher_mixture_logprobs,
                                       teacher_weights, token_logprobs)

B, T, V = 2, 5, 7
MASK = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)  # 7 of 10 positions


def _logits(seed: int, n: int = 1, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, V, generator=g) * scale for _ in range(n)]


def _brute_reverse_kl(student, teachers, weights, mask):
    """Independent float64 reference: explicit loops, softmax written out."""
    def log_softmax(row):
        mx = max(row)
        lse = mx + math.log(sum(math.exp(x - mx) for x in row))
        return [x - lse for x in row]

    s = student.double()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            z = s[b, t]
            logp = z - torch.logsumexp(z, 0)  # differentiable in float64 for the reference gradient
            p = logp.exp()
            for w, tl in zip(weights, teachers):
                lq = torch.tensor(log_softmax(tl[b, t].double().tolist()), dtype=torch.float64)
                total = total + w * (p * (logp - lq)).sum()
            count += 1
    return total / count


@pytest.mark.parametrize("n_teachers,weights", [(1, None), (3, [0.5, 0.3, 0.2])])
def test_reverse_kl_value_and_grad_match_float64_brute_force(n_teachers, weights):
    student = _logits(0)[0].requires_grad_()
    teachers = _logits(1, n_teachers)
    w = weights or [1.0]
    ref_s = student.detach().clone().double().requires_grad_()
    ref = _brute_reverse_kl(ref_s, teachers, w, MASK)
    ref.backward()

    got = reverse_kl(student, teachers if n_teachers > 1 else teachers[0], weights, MASK, chunk_size=2)
    got.backward()
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - ref.item()) < 1e-5 and ref.item() > 0.1
    torch.testing.assert_close(student.grad.double(), ref_s.grad, atol=1e-6, rtol=1e-5)
    assert student.grad[~MASK].abs().max() == 0  # masked positions get no gradient


def test_reverse_kl_chunking_forms_teacher_grad_and_dtypes():
    student = _logits(2)[0].requires_grad_()
    teachers = [t.requires_grad_() for t in _logits(3, 3)]
    w = [0.6, 0.1, 0.3]
    one = reverse_kl(student, teachers, w, MASK, chunk_size=T)
    g_one, = torch.autograd.grad(one, student)
    for chunk in (1, 2, 3):
        many = reverse_kl(student, teachers, w, MASK, chunk_size=chunk)
        g_many, = torch.autograd.grad(many, student)
        torch.testing.assert_close(many, one, atol=1e-6, rtol=0)
        torch.testing.assert_close(g_many, g_one, atol=1e-7, rtol=0)

    # mixture: same gradient, value lower by the mean of -logsumexp_v(sum_i w_i log pi_i) >= 0
    mix = reverse_kl(student, teachers, w, MASK, chunk_size=2, form="mixture")
    g_mix, = torch.autograd.grad(mix, student)
    torch.testing.assert_close(g_mix, g_one, atol=1e-7, rtol=0)
    geo = sum(wi * torch.log_softmax(t.detach().double(), -1) for wi, t in zip(w, teachers))
    const = -torch.logsumexp(geo, -1)[MASK].mean()
    assert const.item() > 0.05  # the forms really differ here
    assert abs((one - mix).item() - const.item()) < 1e-5
    # ... and the mixture helper is that normalised geometric mixture
    q = teacher_mixture_logprobs(teachers, w)
    torch.testing.assert_close(q.double(), geo - torch.logsumexp(geo, -1, keepdim=True), atol=1e-5, rtol=0)
    assert not q.requires_grad

    # teachers never get a gradient
    reverse_kl(student, teachers, w, MASK).backward()
    assert all(t.grad is None for t in teachers) and student.grad is not None

    # bf16 inputs: float32 math, bf16 gradient, same numbers as the upcast inputs
    sb = student.detach().bfloat16().requires_grad_()
    tb = [t.detach().bfloat16() for t in teachers]
    vb = reverse_kl(sb, tb, w, MASK)
    vb.backward()
    sf = sb.detach().float().requires_grad_()
    vf = reverse_kl(sf, [t.float() for t in tb], w, MASK)
    vf.backward()
    assert vb.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16
    assert abs(vb.item() - vf.item()) < 1e-6
    torch.testing.assert_close(sb.grad.float(), sf.grad, atol=1e-3, rtol=1e-2)


def test_reverse_kl_empty_mask_and_identical_teacher():
    student = _logits(4)[0].requires_grad_()
    zero = reverse_kl(student, _logits(5, 2), None, torch.zeros(B, T, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(student.grad).all() and student.grad.abs().max() == 0
    same = reverse_kl(student, student.detach() + 3.0)  # a shifted copy is the same distribution
    assert abs(same.item()) < 1e-6


def test_bad_weights_raise():
    s, ts = _logits(6)[0], _logits(7, 3)
    for bad in ([0.5, 0.5], [0.5, 0.6, -0.1], [0.3, 0.3, 0.3], [float("nan"), 0.5, 0.5]):
        with pytest.raises(ValueError):
            reverse_kl(s, ts, bad)
    with pytest.raises(ValueError):
        sampled_reverse_kl_loss(s, ts, torch.zeros(B, T, dtype=torch.long), [1.0])
    with pytest.raises(ValueError):
        reverse_kl(s, ts, None, form="average")
    assert teacher_weights(torch.tensor([0.25, 0.75]), 2) == [0.25, 0.75]
    assert teacher_weights([0.5, 0.5 + 5e-7], 2)  # within 1e-6 is accepted


def test_token_logprobs_matches_log_softmax():
    logits = _logits(8)[0].requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    gw = torch.randn(B, T, dtype=torch.float64)
    g_ref, = torch.autograd.grad((ref * gw).sum(), logits)
    got = token_logprobs(logits, tokens, chunk_size=2)
    g_got, = torch.autograd.grad((got * gw.float()).sum(), logits)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_got.double(), g_ref.double(), atol=1e-6, rtol=0)


def test_sampled_estimator_gradient_expectation_is_full_reverse_kl_gradient():
    """One position, V=5, N = 20k tokens y ~ p_s (fixed seed): the mean of the per-sample
    surrogate gradients must approach the full-vocabulary reverse-KL gradient."""
    gen = torch.Generator().manual_seed(0)
    n, v = 20_000, 5
    z = (torch.randn(v, generator=gen) * 1.5).requires_grad_()
    teachers = [torch.randn(v, generator=gen) * 1.5 for _ in range(2)]
    w = [0.7, 0.3]

    full = reverse_kl(z.view(1, 1, v), [t.view(1, 1, v) for t in teachers], w)
    g_full, = torch.autograd.grad(full, z)

    y = torch.multinomial(torch.softmax(z.detach(), -1), n, replacement=True, generator=gen).view(1, n)
    student = z.view(1, 1, v).expand(1, n, v)  # n copies of one position: the grad is the mean over samples
    loss, kl_tok = sampled_reverse_kl_loss(student, [t.view(1, 1, v).expand(1, n, v) for t in teachers], y, w)
    g_est, = torch.autograd.grad(loss, z)

    # Tolerance from the estimator's own spread: sample k's gradient is A_k (p - onehot(y_k)); the
    # mean of n of them has std sigma / sqrt(n) per component. 5 standard errors makes a false
    # failure ~1e-6 likely, while a wrong estimator (e.g. a sign error, a missing teacher term or
    # an undetached advantage) is off by far more than that (asserted below).
    p = torch.softmax(z.detach(), -1)
    per_sample = (-kl_tok[0])[:, None] * (p - torch.nn.functional.one_hot(y[0], v))
    se = per_sample.std(0) / math.sqrt(n)
    assert se.max() < 0.01 and g_full.abs().max() > 0.1
    assert ((g_est - g_full).abs() <= 5 * se + 1e-6).all(), (g_est, g_full, se)
    # the logged per-token estimate averages to the sum-form KL
    kl_se = kl_tok.std() / math.sqrt(n)
    assert abs(kl_tok.mean().item() - full.item()) < 5 * kl_se.item()

    # teachers given as per-token log-probs of the sampled tokens: same loss and estimate
    lp_t = [torch.log_softmax(t, -1)[y] for t in teachers]
    loss2, kl2 = sampled_reverse_kl_loss(student, lp_t, y, w)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(kl2, kl_tok)


def test_sampled_estimator_mask():
    s = _logits(9)[0].requires_grad_()
    ts = _logits(10, 2)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    loss, kl = sampled_reverse_kl_loss(s, ts, y, [0.5, 0.5], MASK)
    loss.backward()
    lps = torch.log_softmax(s.detach(), -1).gather(-1, y[..., None])[..., 0]
    m = 0.5 * sum(torch.log_softmax(t, -1).gather(-1, y[..., None])[..., 0] for t in ts)
    torch.testing.assert_close(kl, (lps - m) * MASK, atol=1e-6, rtol=0)
    # value of -mean(A * log p_s(y)) with A = -(log p_s - m)
    torch.testing.assert_close(loss, ((lps - m) * lps)[MASK].mean(), atol=1e-6, rtol=0)
    assert s.grad[~MASK].abs().max() == 0


# --------------------------------------------------------------------------------------------
# GRPO family. Batch: 2 groups of 2 sequences, up to 3 tokens each.
#   rewards: group 0 = [1, 0], group 1 = [3, 1]
#   Dr. GRPO (mean-centred):  group 0 mean 0.5 -> [+0.5, -0.5];  group 1 mean 2 -> [+1, -1]
#   std-scaled (unbiased std): group 0 std = sqrt((0.25 + 0.25) / 1) = 1/sqrt(2) -> [+s, -s]
#                              group 1 std = sqrt((1 + 1) / 1) = sqrt(2)        -> [+s, -s],
#                              s = 1/sqrt(2) (eps 1e-6 is below the test tolerance)
# Per-token ratios r = exp(logprobs - old) and the mask (x = masked; its ratio 7 must not count):
#   seq 0 (A>0): r = [1.0, 1.5, 0.9]   1.5 > 1.28 with A > 0 -> clipped branch active
#   seq 1 (A<0): r = [0.5, 1.2, x]     0.5 < 0.8  with A < 0 -> clipped branch active
#   seq 2 (A>0): r = [1.1, 0.7, x]     0.7 < 0.8 but A > 0  -> min picks the unclipped 0.7 A
#   seq 3 (A<0): r = [1.5, x, x]       1.5 > 1.28 but A < 0 -> min picks the unclipped 1.5 A
# --------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 3.0, 1.0])
RATIOS = torch.tensor([[1.0, 1.5, 0.9], [0.5, 1.2, 7.0], [1.1, 0.7, 7.0], [1.5, 7.0, 7.0]])
GMASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0], [-0.7, -1.1, -4.0], [-2.2, -1.0, -1.0]])
S = 1 / math.sqrt(2)


def _logprobs():
    return (OLD + RATIOS.log()).requires_grad_()


def test_group_advantages_by_hand():
    adv, zv = group_advantages(REWARDS, 2)
    assert adv.tolist() == [0.5, -0.5, 1.0, -1.0] and zv.tolist() == [False, False]
    adv_s, _ = group_advantages(REWARDS.view(2, 2), 2, scale_by_std=True)
    assert adv_s.shape == (2, 2)
    torch.testing.assert_close(adv_s, torch.tensor([[S, -S], [S, -S]]), atol=1e-5, rtol=0)
    # zero-variance groups: exactly 0 advantages (also with std scaling), and flagged
    # 0.9 three times: its float32 mean is not exactly 0.9, so the zeros must be forced, not lucky
    r = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3])
    for scale in (False, True):
        a, zv = group_advantages(r, 3, scale_by_std=scale)
        assert zv.tolist() == [True, False, True]
        assert a[:3].tolist() == [0.0] * 3 and a[6:].tolist() == [0.0] * 3
        assert a[3:6].abs().min() > 0.3
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3)


def test_grpo_token_aggregation_dr_grpo_by_hand():
    lp = _logprobs()
    adv, _ = group_advantages(REWARDS, 2)
    loss, m = grpo_loss(lp, OLD, adv, GMASK)
    # per-token -min(rA, clip(r, 0.8, 1.28) A):
    #   seq 0, A=+0.5: r=1.0 -> -0.5;  r=1.5 -> -min(0.75, 0.64) = -0.64;  r=0.9 -> -0.45
    #   seq 1, A=-0.5: r=0.5 -> -min(-0.25, -0.4) = 0.4;  r=1.2 -> 0.6
    #   seq 2, A=+1:   r=1.1 -> -1.1;  r=0.7 -> -min(0.7, 0.8) = -0.7
    #   seq 3, A=-1:   r=1.5 -> -min(-1.5, -1.28) = 1.5
    # token: (-0.5 - 0.64 - 0.45 + 0.4 + 0.6 - 1.1 - 0.7 + 1.5) / 8 = -0.89 / 8
    assert abs(loss.item() - (-0.89 / 8)) < 1e-6
    assert abs(m["clip_fraction"].item() - 2 / 8) < 1e-7
    assert abs(m["ratio_mean"].item() - (1.0 + 1.5 + 0.9 + 0.5 + 1.2 + 1.1 + 0.7 + 1.5) / 8) < 1e-6
    # approx KL to old, k3 form (r - 1) - log r, token mean
    rs = [1.0, 1.5, 0.9, 0.5, 1.2, 1.1, 0.7, 1.5]
    assert abs(m["approx_kl"].item() - sum(r - 1 - math.log(r) for r in rs) / 8) < 1e-6
    assert "k3_kl" not in m and "tis_weight_mean" not in m
    # gradient: d/dlp of -rA is -rA on active tokens, 0 on the two clipped ones and masked ones
    loss.backward()
    expect = torch.tensor([[-0.5 * 1.0, 0.0, -0.5 * 0.9], [0.0, 0.5 * 1.2, 0.0],
                           [-1.1, -0.7, 0.0], [1.5, 0.0, 0.0]]) / 8
    torch.testing.assert_close(lp.grad, expect, atol=1e-6, rtol=0)


def test_grpo_sequence_aggregation_by_hand():
    adv, _ = group_advantages(REWARDS, 2)
    loss, _ = grpo_loss(_logprobs(), OLD, adv, GMASK, aggregation="sequence")
    # sequence means: (-0.5 - 0.64 - 0.45)/3 = -0.53; (0.4 + 0.6)/2 = 0.5; (-1.1 - 0.7)/2 = -0.9; 1.5/1
    # mean over sequences: (-0.53 + 0.5 - 0.9 + 1.5) / 4 = 0.1425
    assert abs(loss.item() - 0.1425) < 1e-6
    # a fully masked sequence (e.g. a filtered overlong one) leaves the sequence mean, not a 0 in it:
    # without seq 3: (-0.53 + 0.5 - 0.9) / 3 = -0.31
    drop3 = overlong_filter_mask(GMASK, torch.tensor([False, False, False, True]))
    loss3, _ = grpo_loss(_logprobs(), OLD, adv, drop3, aggregation="sequence")
    assert abs(loss3.item() - (-0.31)) < 1e-6


def test_grpo_std_scaled_by_hand():
    adv, _ = group_advantages(REWARDS, 2, scale_by_std=True)  # [+s, -s, +s, -s]
    tok, m = grpo_loss(_logprobs(), OLD, adv, GMASK)
    seq, _ = grpo_loss(_logprobs(), OLD, adv, GMASK, aggregation="sequence")
    # seq 0: -(1.0 + 1.28 + 0.9) s = -3.18 s;  seq 1: (0.8 + 1.2) s = 2.0 s
    # seq 2: -(1.1 + 0.7) s = -1.8 s;           seq 3: 1.5 s
    # token:    (-3.18 + 2.0 - 1.8 + 1.5) s / 8 = -1.48 s / 8
    # sequence: (-3.18/3 + 2.0/2 - 1.8/2 + 1.5/1) s / 4 = (-1.06 + 1.0 - 0.9 + 1.5) s / 4 = 0.54 s / 4
    assert abs(tok.item() - (-1.48 * S / 8)) < 1e-5
    assert abs(seq.item() - (0.54 * S / 4)) < 1e-5
    assert abs(m["clip_fraction"].item() - 2 / 8) < 1e-7


def test_grpo_k3_kl_term_by_hand():
    lp = _logprobs()
    adv, _ = group_advantages(REWARDS, 2)
    # ref - lp = d: log 2 at seq 0 token 0, -log 2 at seq 1 token 1, 0 elsewhere (masked: 5, ignored)
    d = torch.tensor([[math.log(2), 0, 0], [0, -math.log(2), 5.0], [0, 0, 5.0], [0, 5.0, 5.0]])
    ref = lp.detach() + d
    # k3 = e^d - d - 1:  d = log 2 -> 2 - log 2 - 1;  d = -log 2 -> 0.5 + log 2 - 1;  sum = 0.5
    k_a, k_b = 2 - math.log(2) - 1, 0.5 + math.log(2) - 1
    loss, m = grpo_loss(lp, OLD, adv, GMASK, ref_logprobs=ref, kl_coef=0.1)
    assert abs(m["k3_kl"].item() - 0.5 / 8) < 1e-6
    assert abs(loss.item() - (-0.89 / 8 + 0.1 * 0.5 / 8)) < 1e-6
    seq, _ = grpo_loss(lp, OLD, adv, GMASK, ref_logprobs=ref, kl_coef=0.1, aggregation="sequence")
    assert abs(seq.item() - (0.1425 + 0.1 * (k_a / 3 + k_b / 2) / 4)) < 1e-6
    # kl_coef 0 (the default): reported, not added
    loss0, m0 = grpo_loss(lp, OLD, adv, GMASK, ref_logprobs=ref)
    assert abs(loss0.item() - (-0.89 / 8)) < 1e-6 and abs(m0["k3_kl"].item() - 0.5 / 8) < 1e-6
    torch.testing.assert_close(k3_kl(torch.zeros(2), torch.tensor([math.log(2), -math.log(2)])),
                               torch.tensor([k_a, k_b]))


def test_grpo_tis_weights_with_cap_by_hand():
    lp = _logprobs()
    adv, _ = group_advantages(REWARDS, 2)
    # exp(old - sampler) = seq 0: [1, 3 (capped to 2), 0.5], 1 elsewhere (masked: 10, ignored)
    raw = torch.tensor([[1.0, 3.0, 0.5], [1.0, 1.0, 10.0], [1.0, 1.0, 10.0], [1.0, 10.0, 10.0]])
    sampler = OLD - raw.log()
    loss, m = grpo_loss(lp, OLD, adv, GMASK, sampler_logprobs=sampler)
    # seq 0 becomes -0.5*1 - 0.64*2 - 0.45*0.5 = -2.005 (was -1.59): token sum -0.89 - 0.415 = -1.305
    assert abs(loss.item() - (-1.305 / 8)) < 1e-6
    assert abs(m["tis_weight_mean"].item() - (1 + 2 + 0.5 + 5 * 1) / 8) < 1e-6
    loss3, _ = grpo_loss(lp, OLD, adv, GMASK, sampler_logprobs=sampler, tis_cap=3.0)
    # cap 3: seq 0 token 1 weighs 3 -> -0.5 - 1.92 - 0.225 = -2.645; sum -0.89 - 1.055 = -1.945
    assert abs(loss3.item() - (-1.945 / 8)) < 1e-6
    loss.backward()
    assert abs(lp.grad[0, 2].item() - (-0.45 * 0.5 / 8)) < 1e-7  # the weight is detached: just scales


def test_grpo_single_update_is_policy_gradient():
    lp = _logprobs()
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    for agg in ("token", "sequence"):
        loss, m = grpo_loss(lp, lp.detach(), adv, GMASK, aggregation=agg)
        g, = torch.autograd.grad(loss, lp)
        pg = -(adv[:, None] * lp) * GMASK
        ref = pg.sum() / GMASK.sum() if agg == "token" else (pg.sum(1) / GMASK.sum(1)).mean()
        g_ref, = torch.autograd.grad(ref, lp)
        torch.testing.assert_close(g, g_ref)
        torch.testing.assert_close(loss, -(adv[:, None] * torch.ones(4, 3) * GMASK).sum() / GMASK.sum()
                                   if agg == "token" else -(adv * 1.0).mean())
        assert m["clip_fraction"].item() == 0 and abs(m["ratio_mean"].item() - 1) < 1e-7


def test_overlong_penalty_and_filter():
    got = overlong_penalty(torch.tensor([10, 12, 13, 14, 16, 17]), max_len=16, buffer=4)
    # soft zone (12, 16]: (12 - L) / 4
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert overlong_filter_mask(mask, torch.tensor([False, True, False])).tolist() == \
        [[True, True], [False, False], [True, True]]
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 16, 0)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_step_share_makes_accumulation_the_mean_over_the_whole_step(aggregation):
    """Split into micro-batches with different numbers of loss tokens, the accumulated gradient
    (each micro-step's loss weighted by step_share, divided by the accumulation count as the
    trainer does) equals the gradient of the whole batch's loss -- DAPO's token mean over the
    step's batch, GRPO's mean over its sequences; a plain mean per micro-batch does not."""
    g = torch.Generator().manual_seed(0)
    rows, t = 6, 9
    lp0 = torch.randn(rows, t, generator=g, dtype=torch.float64) - 2
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, t, dtype=torch.bool)
    for r, n in enumerate((9, 8, 1, 2, 0, 3)):                     # ragged, one row without tokens
        mask[r, :n] = True

    def grad(parts, weighted):
        lp = lp0.clone().requires_grad_()
        units = [float(mask[p].sum() if aggregation == "token" else (mask[p].sum(-1) > 0).sum()) for p in parts]
        phase = {"loss_units": sum(units), "loss_shards": len(parts)} if weighted else {}
        for p, u in zip(parts, units):
            loss, _ = grpo_loss(lp[p], lp[p].detach(), adv[p], mask[p], aggregation=aggregation)
            (loss * step_share(phase, u) / len(parts)).backward()
        return lp.grad

    whole = grad([slice(0, 6)], weighted=True)
    split = [slice(0, 2), slice(2, 6)]
    torch.testing.assert_close(grad(split, weighted=True), whole, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(grad(split, weighted=False), whole)
    assert step_share({}, 5.0) == 1.0 and step_share({"loss_units": 0.0, "loss_shards": 2}, 0.0) == 1.0
