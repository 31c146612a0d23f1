"""Checkpoint round trips (issue test 4), official-layout loading, FP8 dequantisation, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import Transformer
from nanoseek.checkpoint import dequantize_fp8, to_disk_tensors


def test_round_trip_is_bit_exact_including_mtp(tiny_model, tmp_path):
    with torch.no_grad():
        for m in tiny_model.moe_layers():
            if m.gate.bias is not None:
                m.gate.bias.normal_()
    tiny_model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("mtp.0.") for k in on_disk)
    loaded = Transformer.from_pretrained(tmp_path)
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_sharded_save_writes_an_index_and_loads(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=400_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    loaded = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 1024, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), tiny_model(ids))


def _to_official_layout(src, dst, fp8: bool):
    """Rewrite a saved checkpoint into the official release dialect (no `model.` prefix,
    `embed.weight`, `hc_head_fn`, `attn.kv_norm`), sharded, optionally FP8 block-quantised."""
    tensors = load_file(src / "model.safetensors")
    out = {}
    for k, v in tensors.items():
        name = k
        if k.startswith("model."):
            name = k[len("model."):]
            name = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
                    "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}.get(name, name)
            if ".attn.norm." in name:
                name = name.replace(".attn.norm.", ".attn.kv_norm.")
        if fp8 and v.dim() == 2 and name.endswith(("wq_a.weight", "wq_b.weight", "w1.weight", "w3.weight")):
            scale = v.abs().amax().clamp_min(1e-12) / 448.0  # one block covers these tiny matrices
            scale = torch.exp2(torch.ceil(torch.log2(scale)))  # power-of-two (ue8m0) scales
            out[name] = (v / scale).to(torch.float8_e4m3fn)
            out[name[: -len(".weight")] + ".scale"] = scale.reshape(1, 1).to(torch.float8_e8m0fnu)
        else:
            out[name] = v
    keys = sorted(out)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        save_file({k: out[k] for k in part}, str(dst / f"model-{i:05d}-of-00002.safetensors"))
    weight_map = {k: f"model-{1 if i < half else 2:05d}-of-00002.safetensors" for i, k in enumerate(keys)}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("fp8", [False, True])
def test_official_release_layout_loads(tiny_model, tmp_path, fp8):
    src, dst = tmp_path / "ours", tmp_path / "official"
    dst.mkdir()
    tiny_model.save_pretrained(src)
    _to_official_layout(src, dst, fp8)
    loaded = Transformer.from_pretrained(dst)
    ids = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        diff = (loaded(ids) - tiny_model(ids)).abs().max().item()
    if fp8:
        assert 0 < diff < 0.1  # quantisation error, but the weights are the dequantised originals
        w = tiny_model.layers[1].attn.wq_a.weight
        assert (loaded.layers[1].attn.wq_a.weight - w).abs().max() <= w.abs().max() / 8
    else:
        assert diff == 0.0


def test_dequantize_fp8_blocks():
    w = torch.randn(200, 300)
    scale = torch.tensor([[1.0, 2.0, 4.0], [0.5, 8.0, 1.0]])
    q = (w / scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]).to(torch.float8_e4m3fn)
    deq = dequantize_fp8(q, scale)
    assert deq[0, 0] == q[0, 0].float() * 1.0 and deq[199, 299] == q[199, 299].float() * 1.0
    assert deq[130, 140] == q[130, 140].float() * 8.0
    assert (deq - w).abs().max() < 0.1 * w.abs().max() * 8
    # raw e8m0 bytes (uint8, as kernels hold them) are exponents: 127 is x1, 130 is x8
    e8m0 = torch.tensor([[127, 128, 129], [126, 130, 127]], dtype=torch.uint8)
    assert torch.equal(dequantize_fp8(q, e8m0), deq)
    for bad in (torch.ones(4, 4), torch.ones(2, 2), torch.ones(2, 3, dtype=torch.int32), torch.ones(6)):
        with pytest.raises(ValueError, match="FP8 scale"):   # never cropped or misread
            dequantize_fp8(q, bad)


def test_mismatched_checkpoint_is_rejected_clearly(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Transformer.from_pretrained(tmp_path / "nope")


def test_bf16_load_keeps_fp32_parameters_fp32(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    assert m.layers[0].hc_attn.fn.dtype == torch.float32
    assert m.layers[0].attn.attn_sink.dtype == torch.float32
    ids = torch.randint(0, 1024, (1, 30))
    with torch.no_grad():
        ref = tiny_model(ids)
        got = m(ids)
    assert torch.isfinite(got).all() and (got - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_disk_names_cover_every_state_entry(tiny_model):
    names = to_disk_tensors(tiny_model)
    n_state = sum(v.numel() for v in tiny_model.state_dict().values())
    assert sum(v.numel() for v in names.values()) == n_state
