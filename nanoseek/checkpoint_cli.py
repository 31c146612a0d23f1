"""`nanoseek convert SRC DST --dtype bf16|fp32`: a plain copy of a (FP8/FP4-quantised) checkpoint.

Thin argument parsing over `nanoseek.checkpoint.convert_checkpoint` (shard by shard, bounded
memory); registered in `nanoseek.cli._COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="dequantise an FP8/FP4 checkpoint into a plain bf16/fp32 one (same tensor names)",
        description="Read SRC shard by shard, dequantise FP8 (128x128 blocks) and FP4 (MXFP4 experts), "
                    "cast to --dtype and write DST with the same tensor names, an index, config.json "
                    "without quantization_config, tokenizer files and generation_config.json.",
    )
    p.add_argument("src", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="output dtype (default: bf16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, args.dtype, progress=not args.no_progress)
    print(f"wrote {out} ({args.dtype})")
    return 0
