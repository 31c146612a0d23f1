"""Parity with transformers' independent `deepseek_v4` implementation, both ways (issue test 1)."""

import json
import warnings

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import balanced_hash_table

from .conftest import perturbed

transformers = pytest.importorskip("transformers")


def hf_config(config: ModelConfig):
    d = config.to_dict()
    return transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})


@pytest.fixture(scope="module")
def config():
    # mixes sliding / CSA / HCA layers, hash + routed MoE; index_topk >= #entries so that
    # transformers' arbitrary tie-breaking cannot change the selection
    return ModelConfig.from_preset("tiny", index_topk=64)


def batch(config, seq=70, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (b, seq), generator=g)


def test_transformers_checkpoint_loads_with_same_logits(config, tmp_path):
    torch.manual_seed(0)
    hf = transformers.DeepseekV4ForCausalLM(hf_config(config)).eval()
    perturbed(hf, seed=3)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("tid2eid"):  # transformers leaves it all-zero: give it a real table
                buf.copy_(balanced_hash_table(config.vocab_size, config.n_routed_experts, config.num_experts_per_tok))
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers drops MTP: ours is initialised randomly
        ours = Transformer.from_pretrained(tmp_path).eval()
    ids = batch(config)  # 70 tokens > 8 HCA windows of 8, 17 CSA entries, 4 sliding windows
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().mean() > 0.05  # a non-degenerate model
    assert (got - expected).abs().max().item() <= 1e-4


def test_nanoseek_checkpoint_loads_in_transformers(config, tmp_path):
    torch.manual_seed(0)
    ours = perturbed(Transformer(config), seed=5).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV4ForCausalLM"
    ids = batch(config, seed=2)
    with torch.no_grad():
        expected = ours(ids)
        got = hf(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_written_names_are_the_official_transformers_names(tmp_path, shared_reference):
    """The reference list was produced by transformers' save_pretrained for a 4-layer model."""
    ref = {}
    for line in (shared_reference / "hf-tiny-checkpoint-keys.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        ref[name] = tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
    # the reference model: hidden 256, 4 heads x 64, q_lora 128, o 2x64, 8 experts top-2, CSA 4 / HCA 16
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
                      qk_rope_head_dim=32, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=16,
                      layer_types=["sliding_attention", "compressed_sparse_attention",
                                   "heavily_compressed_attention", "compressed_sparse_attention"],
                      csa_compress_rate=4, hca_compress_rate=16, index_n_heads=2, index_head_dim=32,
                      n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                      mlp_layer_types=["hash_moe", "moe", "moe", "moe"], rope_scaling=None)
    from nanoseek.checkpoint import to_disk_tensors

    with torch.device("meta"):
        model = Transformer(cfg)
    written = {k: tuple(v.shape) for k, v in to_disk_tensors(model).items() if not k.startswith("mtp.")}
    assert written == ref
