"""Packed training rows: per-document attention, compression and positions (V4 report 3.5.3, 4.1)."""

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.transformer import document_positions

from .conftest import perturbed


def packed_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(0, 1024, (1, n), generator=g) for n in row] for row in lengths]
    ids = torch.cat([torch.cat(r, 1) for r in docs], 0)
    doc_ids = torch.cat([torch.cat([torch.full((1, n), i) for i, n in enumerate(row)], 1) for row in lengths], 0)
    return docs, ids, doc_ids


def test_document_positions():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_rows_equal_each_document_alone():
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny", index_topk=3))).eval()
    # tails shorter than a window (m=4 CSA, 8 HCA) and docs shorter than the sliding window (16)
    docs, ids, doc_ids = packed_batch([[23, 40, 17], [9, 71]])
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        for b, row in enumerate(docs):
            off = 0
            for d in row:
                alone = model(d)
                assert (packed[b : b + 1, off : off + d.shape[1]] - alone).abs().max().item() <= 1e-4
                off += d.shape[1]
        # without doc_ids the documents see each other
        assert (model(ids)[0, 23:63] - packed[0, 23:63]).abs().max().item() > 1e-2


def test_packed_loss_trains_and_masks_mtp_across_documents():
    torch.manual_seed(0)
    model = perturbed(Transformer(ModelConfig.from_preset("tiny"))).train()
    docs, ids, doc_ids = packed_batch([[30, 34]], seed=1)
    labels = torch.cat([torch.cat([d[:, 1:], torch.full((1, 1), -100)], 1) for d in docs[0]], 1)
    t = model.loss(ids, labels, doc_ids=doc_ids)
    t.loss.backward()
    assert torch.isfinite(t.loss) and t.n_tokens == 29 + 33
    # the MTP term equals the token-weighted MTP terms of the documents alone
    with torch.no_grad():
        parts = [model.loss(d, mtp_weight=1.0) for d in docs[0]]
        packed = model.loss(ids, labels, doc_ids=doc_ids, mtp_weight=1.0)
    n = [d.shape[1] - 2 for d in docs[0]]
    expect = sum(p.mtp * k for p, k in zip(parts, n)) / sum(n)
    assert torch.allclose(packed.mtp, expect, atol=1e-4)
