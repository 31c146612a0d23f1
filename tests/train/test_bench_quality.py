"""The dense baseline of benchmarks/bench_quality.py: per-document masking and parameter matching."""

from __future__ import annotations

import warnings

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.model import count_parameters

from ..conftest import load_benchmark

transformers = pytest.importorskip("transformers")


def _bench():
    return load_benchmark("bench_quality")


def test_doc_mask_and_positions():
    bq = _bench()
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    mask, pos = bq.doc_mask_and_positions(doc)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    m = mask[:, 0]
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert bool(m[b, i, j]) == (j <= i and doc[b, i] == doc[b, j])


def test_packed_llama_equals_documents_alone():
    """Per-document attention + positions: a packed row gives each document's own logits."""
    bq = _bench()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = bq.llama_config(ModelConfig.from_preset("tiny"), 32)
        torch.manual_seed(0)
        lm = bq.LlamaLM(transformers.LlamaForCausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 11))
    doc = torch.tensor([[3] * 4 + [4] * 7])
    with torch.no_grad():
        packed = lm(ids, doc_ids=doc)
        a, b = lm(ids[:, :4]), lm(ids[:, 4:])
    assert torch.allclose(packed[:, :4], a, atol=1e-5) and torch.allclose(packed[:, 4:], b, atol=1e-5)
    unmasked = lm(ids)
    assert not torch.allclose(unmasked[:, 4:], b, atol=1e-3)   # the mask matters


def test_llama_matches_activated_parameters():
    bq = _bench()
    nano = ModelConfig.from_preset("small").replace(vocab_size=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            llama = transformers.LlamaForCausalLM(bq.llama_config(nano, 256))
    target = count_parameters(nano, activated=True, include_mtp=False)
    got = bq.non_embedding_params(llama)
    # the MLP width moves in steps of 8: 3 * hidden * 8 * layers parameters per step
    assert abs(got - target) <= 3 * nano.hidden_size * 8 * nano.num_hidden_layers / 2
    assert llama.config.hidden_size == nano.hidden_size and llama.config.num_hidden_layers == nano.num_hidden_layers
