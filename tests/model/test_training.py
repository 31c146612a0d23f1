"""Training support: gradients reach every parameter, losses, aux-loss-free balancing (issue test 3)."""

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import MoE, balanced_hash_table, sequence_balance_loss

from .conftest import perturbed


def test_every_parameter_gets_a_gradient_including_the_indexer():
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny", index_topk=3))).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    terms = model.loss(ids)
    assert terms.indexer.item() > 0 and terms.mtp.item() > 0 and terms.balance.item() > 0
    terms.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []
    idx = [n for n, _ in model.named_parameters() if ".indexer." in n]
    assert len(idx) == 2 * 6  # wq_b, weights_proj, compressor wkv/wgate/ape/norm, in 2 CSA layers


def test_indexer_loss_trains_only_the_indexer():
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny", index_topk=3))).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    model.loss(ids, mtp_weight=0, balance_alpha=0, indexer_weight=1.0).indexer.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert with_grad and all(".indexer." in n for n in with_grad)


def test_loss_terms_are_consistent():
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny"))).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    t = model.loss(ids, mtp_weight=0.3, balance_alpha=1e-2, indexer_weight=0.5, return_logits=True)
    expect = t.ce + 0.3 * t.mtp + 1e-2 * t.balance + 0.5 * t.indexer
    assert torch.allclose(t.loss, expect)
    ref = torch.nn.functional.cross_entropy(t.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(t.ce, ref)
    assert t.n_tokens == 2 * 39
    # an untrained model is near-uniform: CE close to ln(vocab)
    assert abs(t.ce.item() - torch.log(torch.tensor(1024.0)).item()) < 0.5


def test_balancing_bias_moves_toward_underloaded_experts_and_is_not_a_parameter():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    moe = [m for m in model.moe_layers() if not m.is_hash][0]
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("gate.bias") for n in names)  # a buffer: no optimizer can touch it
    # a skewed router: expert 0 attracts every token
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] += 1.0
    x = torch.randn(2, 32, model.config.hidden_size).abs() * 3  # x . w_0 >> 0: expert 0 always wins
    ctx_ids = torch.zeros(2, 32, dtype=torch.long)
    from nanoseek.model.context import ForwardContext

    ctx = ForwardContext(positions=torch.arange(32).expand(2, 32), input_ids=ctx_ids)
    moe(x, ctx)
    load = moe.load.clone()
    assert load[0] == 2 * 32 and load.sum() == 2 * 32 * 2
    before = moe.gate.bias.clone()
    model.update_router_bias(speed=0.01)
    delta = moe.gate.bias - before
    assert delta[0] < 0  # overloaded expert becomes less attractive
    assert all(delta[i] > 0 for i in range(len(load)) if load[i] < load.mean())
    assert moe.load.sum() == 0  # accumulator reset
    # optimizer steps never change the bias
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.loss(torch.randint(0, 1024, (1, 16))).loss.backward()
    b = moe.gate.bias.clone()
    opt.step()
    assert torch.equal(b, moe.gate.bias)


def test_padding_stays_out_of_the_expert_load_and_balance_loss():
    """A right-padded row with its token_mask routes, counts and balances exactly like the same
    tokens without padding (main layers and MTP); without the mask the padding is counted."""
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny"))).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 37))
    padded = torch.cat([ids, torch.full((1, 27), 3)], dim=1)
    mask = torch.arange(64).unsqueeze(0) < 37
    labels = torch.cat([ids[:, 1:], torch.full((1, 28), -100)], dim=1)
    moe = [m for m in model.moe_layers() if not m.is_hash]

    def run(x, **kw):
        for m in moe:
            m.load.zero_()
        t = model.loss(x, **kw)
        return t.balance, [m.load.clone() for m in moe]

    bal, load = run(ids)
    bal_masked, load_masked = run(padded, labels=labels, token_mask=mask)
    bal_unmasked, load_unmasked = run(padded, labels=labels)
    assert len(moe) == 3 + 1 and all(float(x.sum()) == 2 * 37 for x in load[:3]) and float(load[3].sum()) == 2 * 36
    for a, b in zip(load, load_masked):
        assert torch.equal(a, b)
    torch.testing.assert_close(bal_masked, bal, rtol=1e-6, atol=0)
    assert float(load_unmasked[0].sum()) == 2 * 64 and not torch.isclose(bal_unmasked, bal)


def test_hash_table_is_balanced_with_distinct_experts():
    t = balanced_hash_table(1000, 8, 2, seed=0)
    assert t.shape == (1000, 2)
    assert (t[:, 0] != t[:, 1]).all()
    counts = torch.bincount(t.flatten(), minlength=8)
    assert counts.max() - counts.min() <= 1


def test_sequence_balance_loss_closed_form():
    # 1 sequence, 2 tokens, 2 experts, top-1: token 0 -> e0, token 1 -> e0
    idx = torch.tensor([[[0], [0]]])
    scores = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
    f = torch.tensor([2.0 * 2 / (1 * 2), 0.0])  # E/(K*T) * count
    p = torch.tensor([(0.75 + 0.5) / 2, (0.25 + 0.5) / 2])
    assert torch.allclose(sequence_balance_loss(idx, scores), (f * p).sum())


def test_moe_matches_per_token_reference():
    """Grouped expert computation equals a naive per-token loop."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    moe = MoE(cfg, "moe")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 10, cfg.hidden_size)
    from nanoseek.model.context import ForwardContext

    y = moe(x, ForwardContext(positions=torch.arange(10)[None]))
    w, idx, _ = moe.gate(x[0], None)
    ref = []
    for t in range(10):
        acc = moe.shared_experts(x[0, t])
        for j in range(cfg.num_experts_per_tok):
            e = idx[t, j]
            h = torch.nn.functional.silu(moe.experts.w1[e] @ x[0, t]) * (moe.experts.w3[e] @ x[0, t])
            acc = acc + w[t, j] * (moe.experts.w2[e] @ h)
        ref.append(acc)
    assert torch.allclose(y[0], torch.stack(ref), atol=1e-5)


def test_bf16_autocast_training_step_is_finite_and_close():
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny"))).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    ref = model.loss(ids).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.loss(ids)
    terms.loss.backward()
    assert abs(terms.loss.item() - ref) < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.layers[0].hc_attn.fn.grad.dtype == torch.float32


def test_bf16_head_outside_autocast_matches_its_oracle():
    """Transformer.head_dtype (the trainer's "head" precision): the loss's LM head + CE take h and
    the head weight in bf16 while the model stays fp32. Oracle: PyTorch's own bf16 product,
    upcast, then F.cross_entropy; the fp32 loss is within bf16 rounding and not equal to it."""
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny"))).train()
    h = torch.randn(96, model.config.hidden_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (96,))
    labels[::7] = -100
    fp32 = model._head_loss(h, labels, -100)
    model.head_dtype = torch.bfloat16
    got = model._head_loss(h, labels, -100)
    gh, gw = torch.autograd.grad(got, (h, model.head.weight))
    ref = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(h.bfloat16(), model.head.weight.bfloat16()).float(), labels)
    rh, rw = torch.autograd.grad(ref, (h, model.head.weight))
    assert gh.dtype == gw.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-5
    assert (gh - rh).abs().max() < 0.02 * rh.abs().max() and (gw - rw).abs().max() < 0.02 * rw.abs().max()
    assert got.item() != fp32.item() and abs(got.item() - fp32.item()) < 0.01 * fp32.item()
    # the whole objective takes it too, and trains
    terms = model.loss(torch.randint(0, model.config.vocab_size, (2, 48)))
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and model.head.weight.grad.dtype == torch.float32


def test_indexer_recall_metric():
    from nanoseek.model.indexer import indexer_recall

    # one query, 4 visible entries; true head-summed mass ranks entries 2 > 0 > 3 > 1
    raw = torch.log(torch.tensor([[[[0.3, 0.05, 0.5, 0.15]]]]))
    visible = torch.ones(1, 1, 4, dtype=torch.bool)
    assert indexer_recall(raw, visible, torch.tensor([[[True, False, True, False]]]), 2).item() == 1.0
    assert indexer_recall(raw, visible, torch.tensor([[[False, True, True, False]]]), 2).item() == 0.5
    # with at most k visible entries every pick is right
    few = torch.tensor([[[True, True, False, False]]])
    assert indexer_recall(raw, few, few, 2).item() == 1.0
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny", index_topk=3))).train()
    t = model.loss(torch.randint(0, model.config.vocab_size, (2, 64)))
    assert 0.0 < t.indexer_recall.item() <= 1.0
