"""FP4 (MXFP4) routed experts in the official layout, FP8 elsewhere, and `nanoseek convert`."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek import Transformer
from nanoseek.checkpoint import E2M1_VALUES, convert_checkpoint, dequantize_fp4, read_shapes
from nanoseek.cli import main as cli_main

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_fp4(w: torch.Tensor, block: int = 32):
    """w [out, in] -> (packed int8 [out, in/2], e8m0 scale [out, in/32], dequantised fp32 values).
    Power-of-two block scale so the block's max maps to <= 6, then the nearest e2m1 value."""
    out_f, in_f = w.shape
    blocks = w.reshape(out_f, in_f // block, block)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))
    x = blocks / scale
    mag = (x.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)          # code 0..7
    codes = (mag | ((x < 0) & (mag > 0)).long() << 3).reshape(out_f, in_f)
    deq = (E2M1[mag] * torch.where(x < 0, -1.0, 1.0) * scale).reshape(out_f, in_f)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)  # low nibble = even
    return packed, scale.reshape(out_f, in_f // block).to(torch.float8_e8m0fnu), deq


def quantize_fp8(w: torch.Tensor, block: int = 128):
    """w [out, in] -> (e4m3 weight, e8m0 scale per 128x128 tile, dequantised fp32 values)."""
    out_f, in_f = w.shape
    bo, bi = -(-out_f // block), -(-in_f // block)
    scale = torch.empty(bo, bi)
    for i in range(bo):
        for j in range(bi):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = torch.exp2(torch.ceil(torch.log2(tile.abs().amax().clamp_min(1e-12) / 448.0)))
    full = scale.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu), q.float() * full


_FP8_NAMES = ("wq_a.weight", "wq_b.weight", "wkv.weight", "wo_a.weight", "wo_b.weight",
              "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight")


def write_official_quantised(model, src, dst, fp4_storage: str = "int8"):
    """The model's checkpoint rewritten in the official release layout: routed experts in FP4
    (+ `.scale` e8m0 [out, in/32]), attention / shared-expert matrices in FP8 (+ `.scale` per
    128x128 tile), the rest as is; 2 shards + index. Returns {official name: dequantised value}."""
    model.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    out, deq = {}, {}
    for k, v in tensors.items():
        name = k
        if k.startswith("model."):
            name = k[len("model."):]
            name = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
                    "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}.get(name, name)
            name = name.replace(".attn.norm.", ".attn.kv_norm.")
        base = name[: -len(".weight")]
        if ".experts." in name and "shared_experts" not in name:
            packed, scale, d = quantize_fp4(v)
            if fp4_storage == "float4":
                packed = packed.view(torch.float4_e2m1fn_x2)
            elif fp4_storage == "uint8":
                packed = packed.view(torch.uint8)
            out[name], out[base + ".scale"], deq[k] = packed, scale, d
        elif name.endswith(_FP8_NAMES):
            q, scale, d = quantize_fp8(v)
            out[name], out[base + ".scale"], deq[k] = q, scale, d
        else:
            out[name] = v
    keys = sorted(out)
    half = len(keys) // 2
    shard = {k: f"model-{1 if i < half else 2:05d}-of-00002.safetensors" for i, k in enumerate(keys)}
    # a weight and its scale may sit in different shards: make one FP4 and one FP8 pair do
    for kind in (".experts.", ".wq_a."):
        w = next(k for k in keys if kind in k and k.endswith(".weight") and shard[k].startswith("model-00001"))
        shard[w[: -len(".weight")] + ".scale"] = "model-00002-of-00002.safetensors"
    for fname in sorted(set(shard.values())):
        save_file({k: out[k] for k in keys if shard[k] == fname}, str(dst / fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "generation_config.json").write_text('{"temperature": 1.0}')
    return deq


def reference_model(model, src, deq):
    """The same model with the dequantised values as its weights (loaded from a plain copy)."""
    tensors = load_file(src / "model.safetensors")
    tensors.update(deq)
    save_file(tensors, str(src / "model.safetensors"))
    return Transformer.from_pretrained(src).eval()


def test_dequantize_fp4_nibble_order_and_table():
    # byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1
    # byte 0xF7: low 7 (6.0), high 0xF (-6.0); byte 0x98: low 8 (-0.0), high 9 (-0.5)
    packed = torch.tensor([[0x21, 0xF7, 0x98, 0x5C]], dtype=torch.uint8)
    scale = torch.tensor([[1.0]])
    got = dequantize_fp4(packed, scale)
    assert got.tolist() == [[0.5, 1.0, 6.0, -6.0, -0.0, -0.5, -2.0, 3.0]]
    assert torch.equal(dequantize_fp4(packed.view(torch.int8), scale), got)
    assert torch.equal(dequantize_fp4(packed.view(torch.float4_e2m1fn_x2), scale), got)
    # every code, with a block scale: 16 codes = 8 bytes per row, 2 blocks of 32 in 64 values
    codes = torch.arange(16)
    row = (codes[0::2] | codes[1::2] << 4).to(torch.uint8).repeat(8)  # 64 bytes = 128 values
    s = torch.tensor([[0.25, 2.0, 1.0, 8.0]]).to(torch.float8_e8m0fnu)
    d = dequantize_fp4(row[None], s)
    assert d.shape == (1, 128)
    want = torch.tensor(E2M1_VALUES).repeat(8) * torch.tensor([0.25, 2.0, 1.0, 8.0]).repeat_interleave(32)
    assert torch.equal(d[0], want)
    with pytest.raises(ValueError):
        dequantize_fp4(packed, torch.ones(1, 1), block=4)


def test_dequantize_fp4_packs_the_input_axis_with_one_scale_per_32_inputs_of_a_row():
    """The layout DeepGEMM's MegaMoE test builds for the V4 experts (weights [E, n, k] -> int8
    [E, n, k // 2] + ue8m0 [E, n, k // 32]) and vLLM's deepseek_v4 loader copies checkpoint
    tensors into: the packed (halved) axis is the input one, scales run along it per row."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (3, 4, 64))                       # [E, out, in] e2m1 codes
    packed = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8).view(torch.int8)
    exps = torch.randint(120, 134, (3, 4, 2), dtype=torch.uint8)   # raw e8m0 bytes, [E, out, in / 32]
    want = torch.tensor(E2M1_VALUES)[codes] * torch.exp2(exps.float() - 127).repeat_interleave(32, -1)
    got = dequantize_fp4(packed, exps)
    assert got.shape == (3, 4, 64) and torch.equal(got, want)
    assert torch.equal(dequantize_fp4(packed, exps.view(torch.float8_e8m0fnu)), want)
    assert dequantize_fp4(packed[:1, :1, :1], torch.tensor([[[0xFF]]], dtype=torch.uint8)).isnan().all()
    with pytest.raises(ValueError, match="dtype"):
        dequantize_fp4(packed, exps.to(torch.int32))
    with pytest.raises(ValueError, match="does not fit"):             # scales along the output axis
        dequantize_fp4(packed, exps.transpose(-1, -2).contiguous())


@pytest.mark.parametrize("fp4_storage", ["int8", "float4", "uint8"])
def test_fp4_fp8_official_checkpoint_loads_to_the_dequantised_model(tiny_model, tmp_path, fp4_storage):
    src, dst = tmp_path / "ours", tmp_path / "official"
    dst.mkdir()
    deq = write_official_quantised(tiny_model, src, dst, fp4_storage)
    with safe_open(str(dst / "model-00001-of-00002.safetensors"), "pt") as f:
        assert any(f.get_slice(k).get_dtype() in ("I8", "F4", "U8") for k in f.keys())
    shapes = read_shapes(dst)
    assert shapes["layers.1.ffn.experts.w1"] == tuple(tiny_model.layers[1].ffn.experts.w1.shape)
    loaded = Transformer.from_pretrained(dst).eval()
    ref = reference_model(tiny_model, src, deq)
    w = loaded.layers[1].ffn.experts.w2
    assert torch.equal(w, ref.layers[1].ffn.experts.w2)
    assert not torch.equal(w, tiny_model.layers[1].ffn.experts.w2)  # it really was quantised
    ids = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref(ids))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_convert_writes_a_plain_checkpoint_with_the_same_names(tiny_model, tmp_path, dtype):
    src, dst, out = tmp_path / "ours", tmp_path / "official", tmp_path / "plain"
    dst.mkdir()
    deq = write_official_quantised(tiny_model, src, dst)
    assert cli_main(["convert", str(dst), str(out), "--dtype", dtype, "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    old = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index["weight_map"]) == {k for k in old if not k.endswith(".scale")}
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (out / "generation_config.json").read_text() == '{"temperature": 1.0}'
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    sizes = 0
    for fname in set(index["weight_map"].values()):
        for k, t in load_file(out / fname).items():
            sizes += t.numel() * t.element_size()
            assert index["weight_map"][k] == fname
            if k.endswith((".experts.3.w1.weight", "wq_a.weight", "embed.weight")):
                assert t.dtype == want, k
    assert index["metadata"]["total_size"] == sizes
    plain = Transformer.from_pretrained(out).eval()
    ref = reference_model(tiny_model, src, deq)
    ids = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        if dtype == "fp32":
            assert torch.equal(plain(ids), ref(ids))
        else:
            assert (plain(ids) - ref(ids)).abs().max() < 0.05
    # DST now holds files: converting into it again is refused (exit 2, one line)
    assert cli_main(["convert", str(dst), str(out), "--no-progress"]) == 2


def test_convert_refuses_a_non_empty_destination_and_bad_dtypes(tiny_model, tmp_path):
    src, dst, out = tmp_path / "ours", tmp_path / "official", tmp_path / "plain"
    dst.mkdir()
    out.mkdir()
    write_official_quantised(tiny_model, src, dst)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_checkpoint(dst, out, "bf16", progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError):
        convert_checkpoint(dst, tmp_path / "other", "fp16", progress=False)
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing", tmp_path / "other", "bf16", progress=False)
    # an empty existing directory is fine; the progress bar path runs too
    (tmp_path / "empty").mkdir()
    convert_checkpoint(dst, tmp_path / "empty", "fp32", progress=True)
    assert (tmp_path / "empty" / "config.json").exists()
