"""`nanoseek info CHECKPOINT_OR_PRESET`: config, parameter counts and KV-cache size, without weights.

Parameters are counted on the meta device, so `nanoseek info pro` (1.6T parameters) allocates
nothing. The cache size is computed from the same layout `DecodeCache` allocates (exact, per
sequence), and also under the official FP8 serving layout of the V4 report (spec section 2:
584 B per compressed/window entry, 132 B per FP8 indexer key) for comparison.

    nanoseek info flash --context 1048576
    nanoseek info runs/speedrun/checkpoint --json
"""

from __future__ import annotations

import argparse
import json
import os

from .._argparse import int_at_least
from ..config import CSA, HCA, PRESETS, ModelConfig
from .cache import cache_nbytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_config(name_or_path: str) -> ModelConfig:
    if os.path.isdir(name_or_path) or name_or_path.endswith(".json"):
        return ModelConfig.from_json(name_or_path)
    if name_or_path in PRESETS:
        return ModelConfig.from_preset(name_or_path)
    raise SystemExit(f"error: {name_or_path!r} is neither a checkpoint directory, a config.json nor a preset "
                     f"({', '.join(PRESETS)})")


def cache_bytes(config: ModelConfig, context: int, dtype_bytes: int = 4) -> int:
    """Bytes one sequence's DecodeCache holds for `context` tokens (cache.cache_nbytes)."""
    return cache_nbytes(config, config.layer_types, 1, context, dtype_bytes)


def official_cache_bytes(config: ModelConfig, context: int) -> int:
    """Bytes under the official FP8 serving layout (spec 2): 448 FP8 + 64 BF16 + 8 B scales per
    entry (scaled to head_dim), FP8 indexer keys with scales, window of sliding_window entries."""
    c = config
    rope = c.qk_rope_head_dim
    entry = (c.head_dim - rope) + 2 * rope + 8
    index_entry = c.index_head_dim + 4
    total = 0
    for t in c.layer_types:
        total += c.sliding_window * entry
        if t in (CSA, HCA):
            m = c.compress_rate(t)
            total += (context // m) * entry
            if t == CSA:
                total += (context // m) * index_entry
    return total


def describe(config: ModelConfig, context: int, dtype: str = "bfloat16") -> dict:
    import torch

    from .transformer import Transformer, count_parameters

    with torch.device("meta"):
        model = Transformer(config)
    total = count_parameters(config, model=model)
    active = count_parameters(config, activated=True, model=model)
    nbytes = cache_bytes(config, context, DTYPE_BYTES[dtype])
    return {
        "config": config.to_dict(),
        "parameters_total": total,
        "parameters_total_without_mtp": count_parameters(config, include_mtp=False, model=model),
        "parameters_activated": active,
        "context": context,
        "cache_dtype": dtype,
        "cache_bytes": nbytes,
        "cache_bytes_per_token": nbytes / max(context, 1),
        "official_fp8_cache_bytes_per_token": official_cache_bytes(config, context) / max(context, 1),
    }


def _fmt_params(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def run_info(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    info = describe(config, args.context, args.cache_dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = config
    counts = {t: c.layer_types.count(t) for t in ("sliding_attention", CSA, HCA)}
    print(f"model            {args.model}")
    print(f"layers           {c.num_hidden_layers} (+{c.num_nextn_predict_layers} MTP): "
          f"{counts['sliding_attention']} sliding, {counts[CSA]} CSA (m={c.csa_compress_rate}), "
          f"{counts[HCA]} HCA (m'={c.hca_compress_rate}); {c.num_hash_layers} hash-routed MoE")
    print(f"width            hidden {c.hidden_size}, {c.num_attention_heads} heads x {c.head_dim} "
          f"(rope {c.qk_rope_head_dim}), q_lora {c.q_lora_rank}, o_groups {c.o_groups} x {c.o_lora_rank}, "
          f"window {c.sliding_window}, hc_mult {c.hc_mult}")
    print(f"experts          {c.n_routed_experts} routed (top-{c.num_experts_per_tok}) + {c.n_shared_experts} shared, "
          f"width {c.moe_intermediate_size}; indexer {c.index_n_heads}x{c.index_head_dim} top-{c.index_topk}")
    print(f"vocab            {c.vocab_size}")
    print(f"parameters       {_fmt_params(info['parameters_total'])} total "
          f"({info['parameters_total']:,}; {_fmt_params(info['parameters_total_without_mtp'])} without MTP), "
          f"{_fmt_params(info['parameters_activated'])} activated per token ({info['parameters_activated']:,})")
    print(f"kv cache         {info['cache_bytes_per_token']:.1f} B/token at context {args.context:,} "
          f"({args.cache_dtype}, this engine's layout: {info['cache_bytes'] / 2**20:.1f} MiB per sequence); "
          f"official FP8 layout: {info['official_fp8_cache_bytes_per_token']:.1f} B/token")
    if args.config:
        print(json.dumps(info["config"], indent=2))
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("info", help="print a model's config, parameter counts and KV-cache size",
                       description="Show config, total/activated parameters and KV-cache bytes per token "
                                   "for a checkpoint directory, a config.json or a preset name.")
    p.add_argument("model", help=f"checkpoint dir, config.json, or preset ({', '.join(PRESETS)})")
    p.add_argument("--max-model-len", "--context", dest="context", metavar="N", type=int_at_least(1), default=8192, help="context length for the cache size (default 8192)")
    p.add_argument("--cache-dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", action="store_true", help="also print the full config.json")
    p.set_defaults(func=run_info)

    # `nanoseek convert`: the checkpoint layer's command lives with `info`
    c = sub.add_parser(
        "convert",
        help="dequantise an FP8/FP4 checkpoint into a plain bf16/fp32 one (same tensor names)",
        description="Read SRC shard by shard, dequantise FP8 (128x128 blocks) and FP4 (MXFP4 experts), "
                    "cast to --dtype and write DST with the same tensor names, an index, config.json "
                    "without quantization_config, tokenizer files and generation_config.json.",
    )
    c.add_argument("src", help="checkpoint directory (config.json + safetensors)")
    c.add_argument("dst", help="output directory (must not exist or be empty)")
    c.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="output dtype (default: bf16)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from nanoseek.checkpoint import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, args.dtype, progress=not args.no_progress)
    print(f"wrote {out} ({args.dtype})")
    return 0
