"""`nanoseek generate`, `nanoseek chat` and `nanoseek serve`: thin wrappers over the engine.

    nanoseek generate --model runs/ckpt --prompt "def fib(n):" --max-new-tokens 64
    nanoseek generate --model runs/ckpt --fim-prefix "def add(a, b):\\n    return " --fim-suffix "\\n"
    nanoseek chat --model runs/ckpt            # /think toggles thinking mode, /reset, /exit
    nanoseek serve --model runs/ckpt --port 8000 --api-key KEY
    nanoseek generate|chat|serve ... --speculative 2   # MTP speculative decoding, 2 drafts per round

A model directory holds config.json + safetensors (Transformer.save_pretrained) and, unless
--tokenizer points elsewhere, the tokenizer files (tokenizer.json, ...) of nanoseek.data.tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def load_model_and_tokenizer(model_dir, tokenizer_dir=None, dtype: str | None = None, threads: int | None = None,
                             compile: bool = False):
    """(Transformer in eval mode, Tokenizer) from a checkpoint directory; clear errors if absent.
    compile=True: torch.compile the decode step (Transformer.compile_blocks; compiles on first use)."""
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..model import Transformer

    if threads:
        torch.set_num_threads(int(threads))
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; pass a directory written by save_pretrained")
    tdir = Path(tokenizer_dir) if tokenizer_dir else d
    if not (tdir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tdir}; pass --tokenizer DIR")
    torch_dtype = getattr(torch, _DTYPES[dtype]) if dtype else None
    model = Transformer.from_pretrained(d, dtype=torch_dtype).eval()
    tok = load_tokenizer(tdir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    if compile:
        model.compile_blocks()
    return model, tok


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weights dtype (default: as saved)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (minutes of compilation on first use; see docs/engine.md)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_speculative_arg(p)


def _add_speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="MTP speculative decoding: K draft tokens per round (0 = off; greedy output is "
                        "unchanged, sampling keeps its distribution; see docs/engine.md)")


def cmd_generate(args) -> int:
    from .generate import fim_prompt, generate_stream

    if args.prompt is None and args.fim_prefix is None and args.fim_suffix is None:
        print("error: give --prompt or --fim-prefix/--fim-suffix", file=sys.stderr)
        return 2
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.threads, args.compile)
    if args.fim_prefix is not None or args.fim_suffix is not None:
        ids = fim_prompt(tok, args.fim_prefix or "", args.fim_suffix or "")
    else:
        ids = [tok.bos_id] + tok.encode(args.prompt)
        sys.stdout.write(args.prompt)
    t0, n, info, run = time.perf_counter(), 0, None, {}
    for ev in generate_stream(model, ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                              args.seed, args.stop, tokenizer=tok, chunk_size=args.chunk_size,
                              speculative_tokens=args.speculative, info=run):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        n += len(ev.tokens)
        info = ev.finish_reason or info
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    spec = ""
    if args.speculative and "runner" in run:
        st = run["runner"].spec_stats
        spec = (f", speculative: {st.acceptance_rate:.0%} of {st.drafted} drafts accepted, "
                f"{st.tokens_per_call:.2f} tokens per verification call")
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, prompt {len(ids)} tokens, "
          f"finish: {info}{spec}]", file=sys.stderr)
    return 0


def _read_message() -> str | None:
    """Read one user message: lines until an empty line (or a single-line /command). None on EOF."""
    lines = []
    while True:
        try:
            line = input("you> " if not lines else "...  ")
        except EOFError:
            return None if not lines else "\n".join(lines)
        if not lines and line.strip().startswith("/"):
            return line.strip()
        if line == "" and lines:
            return "\n".join(lines)
        if line != "" or lines:
            lines.append(line)


def cmd_chat(args) -> int:
    from .. import chat_format
    from .generate import generate_stream

    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.threads, args.compile)
    thinking = args.think
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("nanoseek chat: end a message with an empty line. /think toggles thinking, /reset clears, /exit quits.",
          file=sys.stderr)
    while True:
        msg = _read_message()
        if msg is None or msg in ("/exit", "/quit"):
            return 0
        if msg == "/think":
            thinking = not thinking
            print(f"[thinking mode {'on' if thinking else 'off'}]", file=sys.stderr)
            continue
        if msg == "/reset":
            messages = messages[:1] if args.system else []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if msg.startswith("/"):
            print(f"[unknown command {msg}; use /think, /reset, /exit]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": msg})
        mode = "thinking" if thinking else "chat"
        ids, _ = chat_format.encode_ids(messages, tok, thinking_mode=mode)  # message text stays text
        text = ""
        in_reasoning = thinking
        sys.stdout.write("assistant> ")
        for ev in generate_stream(model, ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                  args.seed, args.stop, tokenizer=tok, max_len=len(ids) + args.max_new_tokens,
                                  speculative_tokens=args.speculative):
            text += ev.text
            piece = ev.text
            if in_reasoning and chat_format.THINK_END in text:
                in_reasoning = False
                piece = piece.replace(chat_format.THINK_END, "\n--- answer ---\n")
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        parsed = chat_format.parse_completion(text, mode)
        reply = {"role": "assistant", "content": parsed["content"]}
        if parsed["reasoning_content"]:
            reply["reasoning_content"] = parsed["reasoning_content"]
        if parsed["tool_calls"]:
            reply["tool_calls"] = parsed["tool_calls"]
        messages.append(reply)


def cmd_serve(args) -> int:
    from ..serve.app import ServeConfig, serve

    cfg = ServeConfig(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent)
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    serve(args.model, args.host, args.port, api_key, tokenizer_dir=args.tokenizer, model_name=args.model_name,
          max_batch=args.max_batch, max_len=args.max_len, dtype=args.dtype, threads=args.threads, config=cfg,
          log_level=args.log_level, speculative_tokens=args.speculative, compile=args.compile)
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or fill in the middle) from a checkpoint, streaming")
    _add_model_args(p)
    p.add_argument("--prompt", default=None, help="prompt text (BOS is prepended)")
    p.add_argument("--fim-prefix", default=None, help="fill-in-the-middle: code before the hole")
    p.add_argument("--fim-suffix", default=None, help="fill-in-the-middle: code after the hole")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk (tokens)")
    _add_sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat (DeepSeek-V4 chat encoding)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", action="store_true", help="start in thinking mode (toggle with /think)")
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $NANOSEEK_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: nanoseek)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots (requests decoding together)")
    p.add_argument("--max-len", type=int, default=4096, help="tokens per slot (prompt + completion)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight; more get HTTP 429")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_speculative_arg(p)
    p.set_defaults(func=cmd_serve)
