"""Checkpoint interchange in the official DeepSeek-V4 format (safetensors + config.json).

Three on-disk dialects are read, one is written:

* **written**: exactly the tensor names transformers' `DeepseekV4ForCausalLM.save_pretrained`
  writes (`../shared/reference/hf-tiny-checkpoint-keys.txt`: `model.layers.0.attn.wq_a.weight`,
  `model.embed_tokens.weight`, `model.hc_head.hc_fn`, `head.weight`, per-expert
  `experts.{i}.w1/w2/w3`, ...), plus the MTP module as `mtp.{k}.*` in the official naming
  (transformers ignores those on load; we keep them). More than `max_shard_bytes` of tensors
  are split into `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`.
* **read**: the above; the official release layout (no `model.` prefix, `embed.weight`,
  `hc_head_fn`, `attn.kv_norm`, sharded with an index); and FP8 block-quantised weights
  (`float8_e4m3fn` weight + `.scale` / `.weight_scale_inv` per 128x128 block, e8m0 or fp32),
  which are dequantised on load; and FP4 routed experts (MXFP4: two e2m1 values per byte,
  [out, in/2], + `.scale` [out, in/32] e8m0, see `dequantize_fp4`), dequantised on load too.
  `convert_checkpoint` (`nanoseek convert`) writes a plain bf16/fp32 copy shard by shard.

Only safetensors and JSON are ever read: nothing is unpickled. This module is a state-dict
adapter: it never imports the model. `Transformer.from_pretrained` builds the model on the meta
device, checks its shapes against the headers (`check_shapes`: a config.json with absurd sizes
is refused before anything is allocated), then materialises it and loads `read_state_dict`.

Internally the model keeps official names except three shapes of difference handled here:
mHC parameters live in modules (`hc_attn.fn` <-> `hc_attn_fn`), the routed experts are stacked
([E, out, in] <-> `experts.{i}.w1.weight`), and the transformers dialect's prefixes/renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .jsonl import read_json


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3

_HC = re.compile(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$")
_HC_OFFICIAL = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight$")
_STACKED = re.compile(r"^(.*\.experts)\.(w[123])$")


# ----------------------------------------------------------------------------- names
def internal_to_official(name: str) -> str:
    return _HC.sub(lambda m: f"{m.group(1)}hc_{m.group(2)}_{m.group(3)}", name)


def official_to_internal(name: str) -> str:
    return _HC_OFFICIAL.sub(lambda m: f"{m.group(1)}hc_{m.group(2)}.{m.group(3)}", name)


def official_to_hf(name: str) -> str:
    """Official release name -> the name transformers' save_pretrained writes."""
    if name.startswith("mtp.") or name == "head.weight":
        return name
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    m = re.fullmatch(r"hc_head_(fn|base|scale)", name)
    if m:
        return f"model.hc_head.hc_{m.group(1)}"
    name = re.sub(r"\.attn\.kv_norm\.", ".attn.norm.", name)
    return "model." + name


def disk_to_official(name: str) -> str:
    """Any supported on-disk name -> official release name."""
    if name == "lm_head.weight":
        return "head.weight"
    if name.startswith("model."):
        name = name[len("model."):]
        if name == "embed_tokens.weight":
            return "embed.weight"
        m = re.fullmatch(r"hc_head\.hc_(fn|base|scale)", name)
        if m:
            return f"hc_head_{m.group(1)}"
        # transformers' dialect calls the main KV norm `attn.norm` (the compressor's norm keeps its name)
        name = re.sub(r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm.", name)
    return name


# ------------------------------------------------------------------------------ save
def to_disk_tensors(model) -> dict[str, torch.Tensor]:
    """The model's persistent state under on-disk (transformers dialect + mtp.*) names."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        off = internal_to_official(name)
        m = _STACKED.match(off)
        if m:
            for i in range(t.shape[0]):
                out[official_to_hf(f"{m.group(1)}.{i}.{m.group(2)}.weight")] = t[i].detach().contiguous()
            continue
        out[official_to_hf(off)] = t.detach().contiguous()
    return out


def save_pretrained(model, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in to_disk_tensors(model).items()}
    cfg = model.config.to_dict()
    cfg["dtype"] = str(model.embed.weight.dtype).replace("torch.", "")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    # remove stale files from an earlier save in the same directory
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if old.exists():
            old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        with open(path / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(path / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------ load
def _shard_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        weight_map = read_json(path / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{path / INDEX_NAME}: its weight_map must map tensor names to file names")
        names = sorted(set(weight_map.values()))
        root = path.resolve()
        for name in names:
            # an index is data from whoever wrote the checkpoint: it names files of this directory only
            if not isinstance(name, str) or Path(name).name != name or (path / name).resolve().parent != root:
                raise ValueError(f"{path / INDEX_NAME}: weight_map names {name!r}, which is not a file of "
                                 f"the model directory")
        return [path / f for f in names]
    if (path / SINGLE_NAME).exists():
        return [path / SINGLE_NAME]
    # (a training checkpoint's optimizer state is safetensors too: never read it as weights)
    files = sorted(f for f in path.glob("*.safetensors") if f.name != "train_state.safetensors")
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors, {INDEX_NAME} or *.safetensors found")
    return files


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block-quantised FP8 weight [out, in] with one scale per block x block tile -> fp32. The
    scale is [ceil(out / block), ceil(in / block)]: e8m0 or fp32 as released, or uint8 holding raw
    e8m0 bytes (as for FP4); any other shape or dtype is refused, never cropped or misread."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight of shape {tuple(weight.shape)}: expected [out, in]")
    out_f, in_f = weight.shape
    want = (-(-out_f // block), -(-in_f // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 scale of shape {tuple(scale.shape)} does not fit a weight of shape "
                         f"{(out_f, in_f)} with {block} x {block} blocks (expected {want})")
    if scale.dtype != torch.uint8 and not scale.is_floating_point():
        raise ValueError(f"FP8 scale of dtype {scale.dtype}: expected e8m0, uint8 e8m0 bytes or a float")
    s = _e8m0_bytes_to_float(scale) if scale.dtype == torch.uint8 else scale.float()
    s = s.repeat_interleave(block, dim=0)[:out_f].repeat_interleave(block, dim=1)[:, :in_f]
    return weight.float() * s


FP4_BLOCK = 32
# e2m1 code -> value (code = sign bit << 3 | exponent << 1 | mantissa): the OCP MX e2m1 grid, as
# DeepGEMM's FP4 helpers decode it (code 8 is -0.0 here, +0.0 there: equal as numbers)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4 = getattr(torch, "float4_e2m1fn_x2", None)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """MXFP4 weight -> fp32 [..., out, in].

    The layout of the DeepSeek-V4 release's routed experts (docs/model.md, "FP4 and convert", names
    the sources checked and what each confirmed): `packed` is [..., out, in // 2], two e2m1 codes
    per byte packed along the input dimension, the LOW nibble holding the even element (2j) and the
    high nibble the odd one (2j+1); stored as int8 (safetensors "I8"), uint8, or
    `float4_e2m1fn_x2` ("F4"). `scale` is [..., out, in // block] (float8_e8m0fnu as released,
    uint8 holding the raw e8m0 exponent bytes, or any float dtype): one power-of-two scale per
    `block` (32) consecutive input elements of a row."""
    if scale.dtype != torch.uint8 and not scale.is_floating_point():
        raise ValueError(f"FP4 scale of dtype {scale.dtype}: expected e8m0, uint8 e8m0 bytes or a float")
    b = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=b.device)
    vals = torch.stack([table[(b & 0x0F).long()], table[(b >> 4).long()]], dim=-1).flatten(-2)
    in_f = vals.shape[-1]
    if scale.shape[:-1] != vals.shape[:-1] or scale.shape[-1] * block < in_f:
        raise ValueError(f"FP4 scale of shape {tuple(scale.shape)} does not fit a weight of logical "
                         f"shape {tuple(vals.shape)} with blocks of {block}")
    s = _e8m0_bytes_to_float(scale) if scale.dtype == torch.uint8 else scale.float()
    s = s.repeat_interleave(block, dim=-1)[..., :in_f]
    return vals * s


def _e8m0_bytes_to_float(b: torch.Tensor) -> torch.Tensor:
    """Raw e8m0 exponent bytes (how kernels such as DeepGEMM's and vLLM's hold the scales) ->
    2^(b - 127); 0xFF is e8m0's NaN."""
    s = torch.exp2(b.float() - 127.0)
    return torch.where(b == 0xFF, torch.full_like(s, float("nan")), s)


def _is_scale(k: str) -> bool:
    return k.endswith(".scale") or k.endswith(".weight_scale_inv")


def _scale_name(k: str, keys) -> str | None:
    base = k[: -len(".weight")] if k.endswith(".weight") else k
    for cand in (base + ".scale", k + "_scale_inv", base + ".weight_scale_inv"):
        if cand in keys:
            return cand
    return None


def _is_fp4_dtype(dtype, has_scale: bool) -> bool:
    """FP4 storage: float4_e2m1fn_x2, or an int8/uint8 weight that comes with a scale (the HF
    release stores the packed experts as I8 next to their `.scale`)."""
    return (_FP4 is not None and dtype == _FP4) or (has_scale and dtype in (torch.int8, torch.uint8))


def _key_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the shard file holding it (headers only)."""
    out: dict[str, Path] = {}
    for f in _shard_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = f
    return out


def _iter_shard(f: Path, key_files: dict[str, Path]):
    """(on-disk name, tensor) for each weight of one shard file, FP8/FP4 dequantised to fp32 and
    scale tensors dropped; a scale stored in another shard is read from there alone."""
    with safe_open(str(f), framework="pt") as sf:
        for k in sf.keys():
            if _is_scale(k):
                continue
            t = sf.get_tensor(k)
            sname = _scale_name(k, key_files)
            fp4 = _is_fp4_dtype(t.dtype, sname is not None)
            if fp4 or t.dtype in _FP8:
                if sname is None:
                    raise ValueError(f"{k}: {'FP4' if fp4 else 'FP8'} weight without a .scale / "
                                     ".weight_scale_inv tensor")
                if key_files[sname] == f:
                    scale = sf.get_tensor(sname)
                else:
                    with safe_open(str(key_files[sname]), framework="pt") as other:
                        scale = other.get_tensor(sname)
                t = dequantize_fp4(t, scale) if fp4 else dequantize_fp8(t, scale)
            yield k, t


def read_official_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under official names, FP8/FP4 dequantised to fp32."""
    path = Path(path)
    key_files = _key_files(path)
    out: dict[str, torch.Tensor] = {}
    for f in _shard_files(path):
        for k, t in _iter_shard(f, key_files):
            out[disk_to_official(k)] = t
    return out


def official_to_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> our module state_dict (stack experts, nest mHC parameters)."""
    sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _EXPERT.match(k)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
            continue
        sd[official_to_internal(k)] = t
    for (prefix, w), parts in experts.items():
        n = max(parts) + 1
        if sorted(parts) != list(range(n)):
            raise ValueError(f"{prefix}: missing experts for {w} (have {sorted(parts)})")
        sd[official_to_internal(f"{prefix}.{w}")] = torch.stack([parts[i] for i in range(n)])
    return sd


# parameters that stay fp32 whatever the model dtype (as in the official release)
FP32_KEEP = re.compile(
    r"(norm\.weight$|hc_(attn|ffn|head)\.|attn_sink$|\.ape$|compressor\.w(kv|gate)\.weight$|gate\.bias$)"
)


def cast_model(model, dtype: torch.dtype):
    """Cast floating parameters to dtype, keeping the fp32-by-design ones (FP32_KEEP) in fp32."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not FP32_KEEP.search(name) and not name.endswith("inv_freq"):
            p.data = p.data.to(dtype)
    return model


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Internal parameter name -> shape, from the safetensors headers alone (no tensor data is
    read): what a config must agree with before anything is allocated. Routed experts stored
    one per tensor are counted into their stacked [E, out, in] shape."""
    path = Path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[int, tuple[int, ...]]] = {}
    key_files = _key_files(path)
    for f in _shard_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if _is_scale(k):
                    continue
                sl = sf.get_slice(k)
                shape = tuple(sl.get_shape())
                dt = sl.get_dtype()
                # packed FP4 stored as bytes: two values per byte (an "F4" header already gives
                # the logical shape: safetensors counts e2m1 elements, torch counts byte pairs)
                if dt in ("I8", "U8") and shape and _scale_name(k, key_files) is not None:
                    shape = (*shape[:-1], shape[-1] * 2)
                name = disk_to_official(k)
                m = _EXPERT.match(name)
                if m:
                    experts.setdefault(official_to_internal(f"{m.group(1)}.{m.group(3)}"), {})[int(m.group(2))] = shape
                else:
                    shapes[official_to_internal(name)] = shape
    for name, parts in experts.items():
        first = parts[min(parts)]
        shapes[name] = (len(parts), *first) if all(p == first for p in parts.values()) else (len(parts), -1)
    return shapes


def check_shapes(path: str | os.PathLike, expected: dict[str, tuple[int, ...]], strict_mtp: bool = False) -> list[str]:
    """Compare a model's expected parameter shapes (built on the meta device: nothing allocated)
    with the checkpoint's headers; raise ValueError on the first disagreement, in one line.
    Returns the expected names the checkpoint lacks (only MTP tensors may be missing)."""
    path = Path(path)
    have = read_shapes(path)
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    non_mtp = [k for k in missing if not k.startswith("mtp.")]
    if non_mtp or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match its config.json: "
            f"missing {non_mtp[:8]}{'...' if len(non_mtp) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, want in expected.items():
        if k in have and have[k] != tuple(want):
            raise ValueError(f"{path}: {k} has shape {have[k]} in the checkpoint, config.json implies {tuple(want)}")
    if missing and strict_mtp:
        raise ValueError(f"{path}: no MTP weights in checkpoint")
    return missing


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's state_dict names (FP8 dequantised)."""
    return official_to_state_dict(read_official_tensors(Path(path)))


# --------------------------------------------------------------------------- convert
_CONVERT_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                   "float32": torch.float32}
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype = "bf16",
                       progress: bool = True) -> Path:
    """Write a plain (unquantised) copy of a checkpoint: FP8/FP4 weights dequantised, floating
    tensors cast to `dtype` (bf16 or fp32; parameters that are fp32 by design, FP32_KEEP, stay
    fp32 when they are stored so), the same tensor names, scale tensors dropped. Shard by shard:
    one input shard (plus the scales it needs) and its output are in memory at a time. config.json
    is copied without its quantization_config, tokenizer files and generation_config.json as they
    are. Refuses a non-empty `dst`."""
    src, dst = Path(src), Path(dst)
    if isinstance(dtype, str):
        if dtype not in _CONVERT_DTYPES:
            raise ValueError(f"--dtype must be bf16 or fp32, not {dtype!r}")
        dtype = _CONVERT_DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be bfloat16 or float32, not {dtype}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a checkpoint directory")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: no config.json")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not an empty directory; refusing to overwrite")
    files = _shard_files(src)
    key_files = _key_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    n = len(files)
    sharded = n > 1 or (src / INDEX_NAME).exists()
    weight_map: dict[str, str] = {}
    total = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="convert", unit="shard")
    for i, f in enumerate(files, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors" if sharded else SINGLE_NAME
        out: dict[str, torch.Tensor] = {}
        for k, t in _iter_shard(f, key_files):
            keep = t.dtype == torch.float32 and FP32_KEEP.search(official_to_internal(disk_to_official(k)))
            if t.is_floating_point() and not keep:
                t = t.to(dtype)
            out[k] = t.contiguous()
            total += t.numel() * t.element_size()
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in out})
        del out
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if sharded:
        with open(dst / INDEX_NAME, "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh,
                      indent=2)
    with open(src / "config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg.pop("quantization_config", None)
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    with open(dst / "config.json", "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")
    for side in _SIDE_FILES:
        if (src / side).is_file():
            shutil.copyfile(src / side, dst / side)
    return dst
