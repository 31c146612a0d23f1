"""Bits per byte: the closed form on a hand-computed case, and a checkpoint on real shards."""

import math

import pytest
import torch

from nanoseek.eval.bpb import bpb_sums, evaluate_bpb, run_bpb
from tests.data.conftest import corpus, fixture_sources, shard_dir, tokenizer_dir  # noqa: F401  (fixtures)


def test_bpb_sums_hand_computed():
    vocab = 8
    logits = torch.zeros(1, 4, vocab)  # uniform: -ln p = ln 8 for every target
    labels = torch.tensor([[3, 0, 5, -100]])  # token 0 is a special token (0 bytes), -100 ignored
    token_bytes = torch.tensor([0, 1, 1, 2, 1, 3, 1, 1])
    nats, nbytes, counted = bpb_sums(logits, labels, token_bytes)
    assert counted == 2 and nbytes == 2 + 3
    assert math.isclose(nats, 2 * math.log(8), rel_tol=1e-6)
    # bpb = 2 * log2(8) bits / 5 bytes
    class Uniform(torch.nn.Module):
        def forward(self, ids, doc_ids=None):
            return torch.zeros(*ids.shape, vocab)

    res = evaluate_bpb(Uniform(), [{"input_ids": labels.clamp(min=0), "labels": labels}], token_bytes)
    assert math.isclose(res["bpb"], 2 * 3 / 5, rel_tol=1e-6)


@pytest.fixture
def one_thread():
    # A tiny model gains nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # waiting threads made each forward 10-50x slower (0.05 s -> 0.5-3 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_bpb_on_shards_matches_a_direct_computation(tmp_path, shard_dir, tokenizer_dir, one_thread):  # noqa: F811
    from nanoseek import ModelConfig, Transformer
    from nanoseek.data.shards import TokenLoader
    from nanoseek.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    # max_tokens keeps the test short (and checks that it stops after the batch that reaches it)
    res = run_bpb(tmp_path, shard_dir, tokenizer_dir, batch_size=2, seq_len=64, max_tokens=1000,
                  progress=False)
    # oracle: CE from log_softmax; bytes from the tokenizer's byte table, itself checked against
    # the UTF-8 length of decoded text
    table = tok.token_byte_lengths()
    sample = tok.encode("def f(x):\n    return x * 2  # émoji ✓\n")
    assert sum(int(table[i]) for i in sample) == len(tok.decode(sample).encode("utf-8"))
    nats, nbytes, counted = 0.0, 0, 0
    loader = TokenLoader(shard_dir, "val", batch_size=2, seq_len=64, tokenizer=tok, shuffle=False, loop=False)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logp = torch.log_softmax(model(batch["input_ids"], doc_ids=batch["doc_ids"]), -1)
            for (b, t), y in zip(torch.nonzero(batch["labels"] >= 0).tolist(), batch["labels"][batch["labels"] >= 0]):
                n = int(table[int(y)])
                if n:
                    nats -= float(logp[b, t, y])
                    nbytes += n
                    counted += 1
            if counted >= 1000:
                break
    assert res["bytes"] == nbytes > 0 and res["tokens"] == counted >= 1000
    assert math.isclose(res["bpb"], nats / (math.log(2) * nbytes), rel_tol=1e-5)
    assert 5 < res["bpb"] < 40  # an untrained model: about log2(1024) bits per ~1-4-byte token
