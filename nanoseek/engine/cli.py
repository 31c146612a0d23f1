"""`nanoseek generate` and `nanoseek chat`: thin wrappers over the engine (`nanoseek serve` is
nanoseek/serve/cli.py).

    nanoseek generate --model runs/ckpt --prompt "def fib(n):" --max-new-tokens 64
    nanoseek generate --model runs/ckpt --fim-prefix "def add(a, b):\\n    return " --fim-suffix "\\n"
    nanoseek chat --model runs/ckpt            # /think toggles thinking mode, /reset, /exit
    nanoseek generate|chat ... --speculative 2   # MTP speculative decoding, 2 drafts per round

A model directory holds config.json + safetensors (Transformer.save_pretrained) and, unless
--tokenizer points elsewhere, the tokenizer files (tokenizer.json, ...) of nanoseek.data.tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from nanoseek._argparse import int_at_least, number_in, show_defaults

from .loading import add_loading_args
from .loading import load_model_and_tokenizer  # noqa: F401  (re-exported: callers import it from here)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    add_loading_args(p)


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=max_new)
    p.add_argument("--temperature", type=number_in(0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=number_in(0, 1, open_lo=True), default=1.0)
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_speculative_arg(p)


def _add_speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", type=int_at_least(0), default=0, metavar="K",
                   help="MTP speculative decoding: K draft tokens per round (0 = off; greedy output is "
                        "unchanged, sampling keeps its distribution; see docs/engine.md)")


# A one-shot `generate` process compiles only for long outputs: loading the cached compiled step
# costs ~8 s (a first-ever compile ~30-60 s) and saves ~20 ms per token on `small`, so it pays
# off after a few hundred tokens. `chat` and `serve` live long: they always take the auto default.
ONE_SHOT_COMPILE_MIN_TOKENS = 512


def one_shot_compile(flag: bool | None, max_new_tokens: int) -> bool | None:
    """--compile / --enforce-eager as given; otherwise auto only for long generations."""
    if flag is not None:
        return flag
    return None if max_new_tokens >= ONE_SHOT_COMPILE_MIN_TOKENS else False


def cmd_generate(args) -> int:
    from .generate import fim_prompt, generate_stream

    if args.prompt is None and args.fim_prefix is None and args.fim_suffix is None:
        print("error: give --prompt or --fim-prefix/--fim-suffix", file=sys.stderr)
        return 2
    args.compile = one_shot_compile(args.compile, args.max_new_tokens)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.threads, args.compile)
    echo = ""
    if args.fim_prefix is not None or args.fim_suffix is not None:
        ids = fim_prompt(tok, args.fim_prefix or "", args.fim_suffix or "")
    else:
        ids = [tok.bos_id] + tok.encode(args.prompt)
        echo = args.prompt
    t0, run = time.perf_counter(), {}
    stream = generate_stream(model, ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                             args.stop, tokenizer=tok, chunk_size=args.chunk_size,
                             speculative_tokens=args.speculative, info=run, compile=args.compile)
    n, info = _print_stream(stream, echo)
    dt = time.perf_counter() - t0
    spec = ""
    if args.speculative and "runner" in run:
        st = run["runner"].spec_stats
        spec = (f", speculative: {st.acceptance_rate:.0%} of {st.drafted} drafts accepted, "
                f"{st.tokens_per_call:.2f} tokens per verification call")
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, prompt {len(ids)} tokens, "
          f"finish: {info}{spec}]", file=sys.stderr)
    return 0


def _print_stream(stream, echo: str) -> tuple[int, str | None]:
    """Write `echo` (the prompt) once the stream has started, so that a warning or an error of
    its set-up comes first and alone, then each delta's text, then a newline. Returns (tokens,
    finish reason)."""
    n, info, started = 0, None, False
    try:
        for ev in stream:
            if not started:
                sys.stdout.write(echo)
                started = True
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            n += len(ev.tokens)
            info = ev.finish_reason or info
        if not started:
            sys.stdout.write(echo)
            started = True
    finally:
        if started:  # (also before the line of an error met mid-stream)
            sys.stdout.write("\n")
            sys.stdout.flush()
    return n, info


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


def _background_warm_up(model, need: int) -> threading.Thread | None:
    """A daemon thread compiling `model`'s decode step (generate.warm_up_decode), or None for an
    eager model. Only this thread uses the model until _finish_warm_up joins it."""
    if not getattr(model, "blocks_compiled", False):
        return None
    from .generate import warm_up_decode

    def run():
        try:
            warm_up_decode(model, need)
        except Exception:  # noqa: BLE001 -- the first turn then meets (and reports) the same error
            pass

    t = threading.Thread(target=run, name="nanoseek-warm-up", daemon=True)
    t.start()
    return t


def _finish_warm_up(t: threading.Thread) -> None:
    if t.is_alive():
        print("[compiling the decode step: once per model shape on this machine, seconds once cached]",
              file=sys.stderr, flush=True)
        t.join()


def cmd_chat(args) -> int:
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.threads, args.compile)
    # the decode step compiles while the first message is being typed (a typical first turn:
    # a short prompt + --max-new-tokens, in the same cache bucket)
    warming = _background_warm_up(model, 64 + args.max_new_tokens)
    try:
        return _chat_loop(args, model, tok, warming)
    finally:
        # (leaving while the thread is inside torch's C++ code aborted the interpreter's exit)
        if warming is not None and warming.is_alive():
            print("[finishing the decode step's compilation before exiting]", file=sys.stderr, flush=True)
            warming.join()


def _chat_loop(args, model, tok, warming: threading.Thread | None) -> int:
    from .. import chat_format
    from .generate import generate_stream

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
        if warming is not None:
            _finish_warm_up(warming)
            warming = None
        text = ""
        in_reasoning = thinking
        sys.stdout.write("assistant> ")
        for ev in generate_stream(model, ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                  args.seed, args.stop, tokenizer=tok,
                                  speculative_tokens=args.speculative, compile=args.compile):
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


def add_subcommands(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or fill in the middle) from a checkpoint, streaming")
    _add_model_args(p)
    p.add_argument("--prompt", default=None, help="prompt text (BOS is prepended)")
    p.add_argument("--fim-prefix", default=None, help="fill-in-the-middle: code before the hole")
    p.add_argument("--fim-suffix", default=None, help="fill-in-the-middle: code after the hole")
    p.add_argument("--chunk-size", type=int_at_least(1), default=512, help="prefill chunk (tokens)")
    _add_sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat (DeepSeek-V4 chat encoding)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", action="store_true", help="start in thinking mode (toggle with /think)")
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)
    for name in ("generate", "chat"):
        show_defaults(sub.choices[name])


