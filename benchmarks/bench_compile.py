"""Benchmark: torch.compile (Transformer.compile_blocks, regional per-block compilation) vs eager.

Three measurements; the first two eager vs compiled on the same weights in one process, runs
alternating so that load drift on a shared machine hits both alike; only the printed ratios mean much:
  * train: one training step of the full V4 objective (CE + MTP + balance + indexer KL, packed
    documents) forward + backward, tokens/s; the optimizer step is excluded (compile does not
    touch it). The first compiled step's time is reported as the compile time.
  * decode: batch-1 greedy decode tokens/s after a --prompt-token prompt through the engine
    (nanoseek.generate_stream, prefill excluded), eager vs compile=True; with --transformers
    also transformers' generate on the same weights in the same run (the issue's baseline).
  * startup: seconds from a new process's start to its first 16 tokens once one earlier process
    has compiled the decode graphs into the on-disk caches (at --prompt tokens), the later
    processes with the prompt lengths of --then; against a baseline in alternating
    subprocesses, each variant with a cache of its own: `exact` (the default), caches sized to
    prompt + new tokens as before engine/compiling.decode_capacity's buckets (every new length a
    new compilation), or `autocast`, the graphs as they were before model/precision.py
    (autocast calls in them, refused by AOT autograd's cache).

    python benchmarks/bench_compile.py decode --preset small --threads 1            # ~10 min on 2 busy cores
    python benchmarks/bench_compile.py decode --preset small --threads 1 --transformers
    python benchmarks/bench_compile.py decode --preset small --python-wrapper   # C++ vs Python graph wrapper
    python benchmarks/bench_compile.py decode --preset small --no-reductions   # gemv.linear's reductions vs MKL
    python benchmarks/bench_compile.py decode --preset small --flash-decode    # attention as reductions vs the flash kernel
    python benchmarks/bench_compile.py decode --preset small --per-block       # 2-block decode graphs vs 1 per block
    python benchmarks/bench_compile.py decode --preset small --guarded         # direct steady-state steps vs guards
    python benchmarks/bench_compile.py decode --preset small --no-memory-planning   # pooled graph buffers vs not
    python benchmarks/bench_compile.py startup --preset small                  # warm starts at new lengths
    python benchmarks/bench_compile.py startup --preset small --baseline autocast --reps 3   # at one length
    python benchmarks/bench_compile.py train --preset tiny --batch 4 --seq 512
    python benchmarks/bench_compile.py train --preset small --batch 4 --seq 512     # long compile on a CPU
    python benchmarks/bench_compile.py train --preset small --bf16 --reps 5   # under bf16 autocast

Compilation is cached on disk by inductor (/tmp/torchinductor_$USER), so a second process
compiles faster than the first; --fresh-cache measures a cold compile.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import generate_stream
from nanoseek.engine.compiling import decode_compile_options
from nanoseek.model import dispatch, gemv
from nanoseek.model.attention import Attention


def _batch(vocab: int, b: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    # packed rows as the trainer's loader makes them: a few documents per row
    doc = (torch.rand(b, s, generator=g) < 4 / s).int().cumsum(1)
    return ids, doc


def bench_train(args) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    eager = Transformer(config)
    compiled = copy.deepcopy(eager).compile_blocks(backend=args.backend)
    ids, doc = _batch(config.vocab_size, args.batch, args.seq)
    n_tok = ids.numel()

    def step(model):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                t = model.loss(ids, doc_ids=doc)
            t.loss.backward()
            model.zero_grad(set_to_none=True)
            return float(t.loss.detach())
        return run

    print(f"train step ({args.preset}, batch {args.batch}x{args.seq}, full objective fwd+bwd, "
          f"threads={torch.get_num_threads()}, backend={args.backend}, {'bf16 autocast' if args.bf16 else 'fp32'})",
          flush=True)
    t0 = time.perf_counter()
    loss_c = step(compiled)()
    compile_s = time.perf_counter() - t0
    loss_e = step(eager)()
    print(f"  first compiled step (compilation): {compile_s:.1f} s; loss eager {loss_e:.5f} compiled {loss_c:.5f}",
          flush=True)
    times = {"eager": [], "compiled": []}
    for _ in range(args.reps):
        for name, model in (("eager", eager), ("compiled", compiled)):
            t = time.perf_counter()
            step(model)()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("eager", "compiled"):
        print(f"  {k:8s}: {n_tok / med[k]:8.1f} tok/s  (step {med[k] * 1e3:.0f} ms; runs "
              f"{', '.join(f'{n_tok / t:.0f}' for t in times[k])})")
    print(f"  ratio compiled / eager: {med['eager'] / med['compiled']:.2f}x")


def bench_decode(args) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    eager = Transformer(config).eval()
    compiled = copy.deepcopy(eager)
    prompt = torch.randint(32, config.vocab_size, (args.prompt,)).tolist()
    n = args.new_tokens

    def once(model, compile_: bool):
        # the copy compiled without the reductions traced (and guards) the switch off
        gemv.reduction_in_graphs = model is not nored
        Attention.decode_reductions = model is not flash  # (that copy: the CPU flash kernel in its graphs)
        dispatch.enabled = model is not guarded  # that copy checks dynamo's guards at every step
        stamps, toks = [], []
        for ev in generate_stream(model, prompt, n, stop_on_eos=False, compile=compile_):
            for t in ev.tokens:
                stamps.append(time.perf_counter())
                toks.append(t)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), toks

    print(f"batch-1 decode ({args.preset}, prompt {args.prompt} tokens, {n} new tokens, "
          f"threads={torch.get_num_threads()}, backend={args.backend})", flush=True)
    # the engine's options (on CPU: inductor's C++ wrapper, engine/compiling.py)
    options = decode_compile_options("cpu") if args.backend == "inductor" else {}
    nored = guarded = flash = None
    compiled.compile_blocks(backend=args.backend, **options)
    t0 = time.perf_counter()
    _, toks_c = once(compiled, True)
    print(f"  first compiled generation (compilation + {n} tokens): {time.perf_counter() - t0:.1f} s", flush=True)
    _, toks_e = once(eager, False)
    variants = {}  # copies compiled another way, timed alongside: name -> model
    if args.python_wrapper:  # the same graphs called through generated Python instead of C++
        variants["Python wrapper"] = copy.deepcopy(eager).compile_blocks(backend=args.backend)
    if args.no_reductions:  # the same graphs with MKL's products instead of gemv.linear's reductions
        variants["no reductions"] = nored = copy.deepcopy(eager).compile_blocks(backend=args.backend, **options)
    if args.flash_decode:  # the same graphs with the CPU flash kernel instead of the one-query attention's reductions
        variants["flash attention"] = flash = copy.deepcopy(eager).compile_blocks(backend=args.backend, **options)
    if args.per_block:  # one decode graph per block (+ one for the tail's) instead of decode_groups' runs
        variants["per-block graphs"] = copy.deepcopy(eager).compile_blocks(
            backend=args.backend, decode_group_size=1, **options)
    if args.no_memory_planning:  # the engine's options without inductor's pooled buffers
        plain = {"options": {k: v for k, v in options.get("options", {}).items() if k != "memory_planning"}}
        variants["no memory planning"] = copy.deepcopy(eager).compile_blocks(backend=args.backend, **plain)
    if args.guarded:  # the same graphs, every step through dynamo's guards (model/dispatch.py)
        variants["guarded steps"] = guarded = copy.deepcopy(eager).compile_blocks(backend=args.backend, **options)
    for name, model in variants.items():
        print(f"  {name} copy compiled; greedy tokens identical to eager: {once(model, True)[1] == toks_e}", flush=True)
    hf_run = None
    if args.transformers:
        from bench_generate import transformers_decode  # benchmarks/ is the script's directory

        hf_run = transformers_decode(eager, prompt, n)[1]

    runs = {"eager": [], "compiled": [], **{name: [] for name in variants}, "transformers": []}
    for _ in range(args.reps):
        runs["eager"].append(once(eager, False)[0])
        runs["compiled"].append(once(compiled, True)[0])
        for name, model in variants.items():
            runs[name].append(once(model, True)[0])
        if hf_run is not None:
            runs["transformers"].append(hf_run())
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    for k, v in med.items():
        print(f"  {k:16s}: {v:7.1f} tok/s  (runs: {', '.join(f'{r:.1f}' for r in runs[k])})")
    print(f"  ratio compiled / eager: {med['compiled'] / med['eager']:.2f}x; "
          f"greedy tokens identical: {toks_c == toks_e}")
    for name in variants:
        print(f"  ratio compiled (engine options) / {name}: {med['compiled'] / med[name]:.2f}x")
    if "transformers" in med:
        print(f"  ratio eager / transformers: {med['eager'] / med['transformers']:.2f}x, "
              f"compiled / transformers: {med['compiled'] / med['transformers']:.2f}x (target >= 4x)")


# One process's start: build the model, time its first default `generate` (compiling the decode
# step, or loading it from the on-disk caches), print that and AOT autograd's cache counters.
# "autocast" re-creates the graphs as they were before model/precision.py: every fp32 region
# entered autocast(enabled=False), which AOT autograd's cache refuses.
_STARTUP = """
import contextlib, json, sys, time, torch
t0 = time.perf_counter()
from nanoseek import ModelConfig, Transformer
from nanoseek.engine.generate import generate
if sys.argv[1] == "autocast":
    from nanoseek.model import attention, compressor, hyper_connections, moe
    def always(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    for m in (attention, compressor, hyper_connections, moe):
        m.fp32_region = always
if int(sys.argv[4]):
    torch.set_num_threads(int(sys.argv[4]))
torch.manual_seed(0)
config = ModelConfig.from_preset(sys.argv[2])
model = Transformer(config).eval()
ids = torch.randint(32, config.vocab_size, (int(sys.argv[3]),)).tolist()
# "exact": the cache just long enough, as before the capacity buckets (engine/compiling.py)
max_len = len(ids) + 16 if sys.argv[1] == "exact" else None
t = time.perf_counter()
generate(model, ids, 16, stop_on_eos=False, max_len=max_len)
first = time.perf_counter() - t
from torch._dynamo.utils import counters
print(json.dumps({"first": first, "process": time.perf_counter() - t0, "aot": dict(counters["aot_autograd"]),
                  "graphs": counters["inductor"].get("fxgraph_cache_miss", 0)}))
"""


def bench_startup(args) -> None:
    """Seconds from a new process's start to its first 16 generated tokens once an earlier
    process has compiled the decode graphs (at --prompt tokens) into the on-disk caches: the
    default against --baseline, each first compiled once into a cache of its own, then started
    at each length of args.then (startup_lengths) in alternation."""
    import json
    import subprocess
    import sys

    def start(variant: str, cache: str, prompt: int) -> dict:
        env = {**os.environ, "NANOSEEK_CACHE": cache, "NANOSEEK_COMPILE": "1"}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        out = subprocess.run([sys.executable, "-c", _STARTUP, variant, args.preset, str(prompt),
                              str(args.threads or 0)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"the {variant} process ({prompt}-token prompt) failed: {last}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    then = args.then  # (prompt lengths, see startup_lengths)
    print(f"process start to 16 tokens ({args.preset}; each variant compiles once into an empty cache of its "
          f"own at a {args.prompt}-token prompt, then new processes with prompts of {then} tokens)", flush=True)
    caches = {v: tempfile.mkdtemp(prefix=f"nanoseek-{v}-") for v in ("now", args.baseline)}
    for v, cache in caches.items():
        cold = start(v, cache, args.prompt)
        print(f"  {v:8s}: empty cache {cold['first']:.1f} s", flush=True)
    runs: dict[str, list] = {v: [] for v in caches}
    for n in then:
        for v, cache in caches.items():
            runs[v].append(start(v, cache, n))
    med = {}
    for v, rs in runs.items():
        med[v] = statistics.median(r["first"] for r in rs)
        firsts = ", ".join(f"{n}: {r['first']:.1f}" for n, r in zip(then, rs))
        print(f"  {v:8s}: warm cache {med[v]:.1f} s to 16 tokens (prompt tokens: seconds {firsts}; "
              f"whole process {statistics.median(r['process'] for r in rs):.1f} s; graphs compiled (inductor cache misses) "
              f"{[r['graphs'] for r in rs]}; AOT autograd cache {rs[-1]['aot']})")
    print(f"  ratio warm start, {args.baseline} / now: {med[args.baseline] / med['now']:.2f}x")


def startup_lengths(then: str | None, baseline: str, prompt: int, reps: int) -> list[int]:
    """--then as prompt lengths (ValueError for anything but positive integers); by default new
    lengths against `exact` (what it recompiles for), the compile length again against `autocast`."""
    if then is None:
        then = "300,411,700" if baseline == "exact" else ""
    try:
        lengths = [int(n) for n in then.split(",")] if then.strip() else [prompt] * reps
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise ValueError(f"prompt lengths must be positive integers, comma-separated; got {then!r}")
    return lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "decode", "startup"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--then", default=None,
                    help="startup: prompt lengths of the processes after the first, comma-separated ('' = "
                         "--prompt, --reps times; default 300,411,700 against `exact`, '' against `autocast`)")
    ap.add_argument("--baseline", choices=["exact", "autocast"], default="exact",
                    help="startup: caches sized exactly (before the capacity buckets) or autocast calls in the graphs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--bf16", action="store_true",
                    help="train: under bf16 autocast (what `nanoseek train --autocast auto` picks on CPUs with native "
                         "bf16 matmuls at width >= 512)")
    ap.add_argument("--per-block", action="store_true",
                    help="decode: also time a copy compiled with one graph per block (decode_group_size=1)")
    ap.add_argument("--no-memory-planning", action="store_true",
                    help="decode: also a copy compiled without inductor's memory planning (the engine uses it on CPU)")
    ap.add_argument("--guarded", action="store_true",
                    help="decode: also a copy whose every step checks dynamo's guards (model/dispatch.py off)")
    ap.add_argument("--transformers", action="store_true", help="decode: also time transformers' generate")
    ap.add_argument("--fresh-cache", action="store_true", help="use an empty inductor cache (cold compile)")
    ap.add_argument("--python-wrapper", action="store_true",
                    help="decode: also a copy compiled with inductor's Python wrapper (the engine uses the C++ one on CPU)")
    ap.add_argument("--no-reductions", action="store_true",
                    help="decode: also a copy compiled with gemv.reduction_in_graphs off (MKL's products in the graphs)")
    ap.add_argument("--flash-decode", action="store_true",
                    help="decode: also a copy compiled with Attention.decode_reductions off (the CPU flash kernel in the graphs)")
    args = ap.parse_args()
    if args.prompt < 1:
        ap.error(f"--prompt must be at least 1 token, got {args.prompt}")
    if args.what == "startup":
        try:
            args.then = startup_lengths(args.then, args.baseline, args.prompt, args.reps)
        except ValueError as e:
            ap.error(f"--then: {e}")
    if args.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    {"train": bench_train, "decode": bench_decode, "startup": bench_startup}[args.what](args)


if __name__ == "__main__":
    main()
