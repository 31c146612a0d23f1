"""`nanoseek serve`: the OpenAI-compatible HTTP server (app.py) over a checkpoint.

    nanoseek serve runs/ckpt --port 8000 --api-key KEY
    nanoseek serve --model runs/ckpt ...                      # the same (--model is still accepted)
    nanoseek serve runs/ckpt --max-model-len 8192 --max-num-seqs 16 --served-model-name coder  # vLLM's spellings
    nanoseek serve runs/ckpt --speculative 2                  # MTP speculative decoding, 2 drafts per round
    nanoseek serve runs/ckpt --shutdown-timeout 30            # SIGTERM: running requests get 30 s

A model directory holds config.json + safetensors (Transformer.save_pretrained) and, unless
--tokenizer points elsewhere, the tokenizer files. The API key may also come from $NANOSEEK_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys

from nanoseek._argparse import int_at_least, number_in, show_defaults
from nanoseek.engine.loading import add_loading_args


def cmd_serve(args) -> int:
    from .app import serve
    from .protocol import ServeConfig

    model = args.model_pos or args.model
    if model is None:
        print("error: give the model directory: nanoseek serve MODEL (or --model MODEL)", file=sys.stderr)
        return 2
    if args.model_pos and args.model and args.model_pos != args.model:
        print(f"error: two models given ({args.model_pos}, --model {args.model})", file=sys.stderr)
        return 2
    cfg = ServeConfig(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent,
                      shutdown_timeout=args.shutdown_timeout)
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    try:
        serve(model, args.host, args.port, api_key, tokenizer_dir=args.tokenizer, model_name=args.model_name,
              max_batch=args.max_batch, max_len=args.max_len, dtype=args.dtype, threads=args.threads, config=cfg,
              log_level=args.log_level, speculative_tokens=args.speculative, compile=args.compile)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--model", default=None, help="the same, as an option")
    add_loading_args(p)
    p.add_argument("--speculative", type=int_at_least(0), default=0, metavar="K",
                   help="MTP speculative decoding: K draft tokens per round (0 = off; see docs/engine.md)")


def add_subcommands(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int_at_least(0, 65535), default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $NANOSEEK_API_KEY)")
    p.add_argument("--served-model-name", "--model-name", dest="model_name", metavar="NAME", default=None,
                   help="model id clients use (default: nanoseek)")
    p.add_argument("--max-num-seqs", "--max-batch", dest="max_batch", metavar="N", type=int_at_least(1), default=8,
                   help="decode slots (requests decoding together)")
    p.add_argument("--max-model-len", "--max-len", dest="max_len", metavar="N", type=int_at_least(2), default=4096,
                   help="tokens per slot (prompt + completion); at most the checkpoint's max_position_embeddings")
    p.add_argument("--max-body-bytes", type=int_at_least(1), default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int_at_least(1), default=None)
    p.add_argument("--max-tokens-limit", type=int_at_least(1), default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-concurrent", type=int_at_least(1), default=64, help="requests in flight; more get HTTP 429")
    p.add_argument("--shutdown-timeout", type=number_in(0), default=10.0,
                   help="on SIGTERM: seconds running requests get to finish before they are ended (default 10)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    show_defaults(p)


