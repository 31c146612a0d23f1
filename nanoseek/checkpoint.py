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
  which are dequantised on load. FP4 (`float4_e2m1fn_x2`, the Pro release's experts) is
  rejected with a clear error: not supported yet.

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
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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
        with open(path / INDEX_NAME, encoding="utf-8") as f:
            index = json.load(f)
        names = sorted(set(index["weight_map"].values()))
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
    """Block-quantised FP8 weight [out, in] with one scale per block x block tile -> fp32."""
    out_f, in_f = weight.shape
    s = scale.float()
    s = s.repeat_interleave(block, dim=0)[:out_f].repeat_interleave(block, dim=1)[:, :in_f]
    return weight.float() * s


def read_official_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under official names, FP8 dequantised to fp32."""
    path = Path(path)
    raw: dict[str, torch.Tensor] = {}
    for f in _shard_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                raw[k] = sf.get_tensor(k)
    out: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        if k.endswith(".scale") or k.endswith(".weight_scale_inv"):
            continue
        if t.dtype == getattr(torch, "float4_e2m1fn_x2", None):
            raise NotImplementedError(
                f"{k}: FP4 (float4_e2m1fn_x2) weights are not supported yet; convert the checkpoint "
                "to bf16 first (e.g. with the official convert.py)"
            )
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            base = k[: -len(".weight")] if k.endswith(".weight") else k
            scale = raw.get(base + ".scale", raw.get(k + "_scale_inv", raw.get(base + ".weight_scale_inv")))
            if scale is None:
                raise ValueError(f"{k}: FP8 weight without a .scale / .weight_scale_inv tensor")
            t = dequantize_fp8(t, scale)
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
    for f in _shard_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.endswith(".scale") or k.endswith(".weight_scale_inv"):
                    continue
                shape = tuple(sf.get_slice(k).get_shape())
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
