"""Benchmark: nanoseek vs transformers' DeepseekV4ForCausalLM on the `small` config, same process.

Measures, for both implementations on identical weights (the issue's table, "as a new user would"):
  * training step tokens/s at batch 4 x seq 512 (forward + CE + backward + AdamW), fp32 and bf16
    autocast, the two implementations alternating (two steps each, the second timed), with MFU against a matmul peak measured
    in the same run and the step's peak RSS;
  * prefill time of a 512-token prompt (batch 1);
  * `nanoseek.generate` with default options (the decode step compiles where it can, see
    engine/compiling.py; the first call, compilation included, is reported apart) vs
    transformers' `generate`: greedy, batch 1, 64 new tokens after a 512-token prompt, prefill
    included, the two in alternating rounds (the machine's speed drifts); plus the tok/s as a
    share of the memory-bandwidth roofline (activated fp32 weight bytes per token / a read
    bandwidth measured in the same run);
and prints nanoseek/transformers ratios (training: the better of fp32 / bf16 on each side).
Inference is measured first, training after it (see main: right after training steps, this VM
runs memory-bound code slower for a while).

    python benchmarks/bench_model.py                 # full run (~10 min on 2 cores)
    python benchmarks/bench_model.py --quick         # fewer steps, shorter sequences
    python benchmarks/bench_model.py --only nanoseek  # skip transformers
    python benchmarks/bench_model.py --only nanoseek --bf16-decode   # + bf16-weight decoding: speed, quality
    python benchmarks/bench_model.py --generate-only 7   # only generate vs transformers, 7 alternating rounds

The machines are noisy: timings are medians over repeated steps, and only ratios measured in
the same run are meaningful. Aggregate decode at 8 concurrent requests: bench_generate.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek._runtime import keep_freed_memory
from nanoseek.model import count_parameters


def in_transformers(model):
    """The same weights in transformers' DeepseekV4ForCausalLM, fp32, loaded from our checkpoint
    format (which is also the interchange test); None when transformers is not installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)


def matmul_peak(dtype=torch.float32, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical peak MFU is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def read_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Bytes/s of a reduction over a tensor much larger than the caches: the decode roofline."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times)


def peak_rss_during(fn) -> float:
    """Peak resident memory (MiB) while fn() runs: Linux's high-water mark, reset first
    (/proc/self/clear_refs); NaN where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        fn()
        return float("nan")


def train_flops_per_token(config: ModelConfig, seq: int) -> float:
    """6 * activated matmul parameters + attention score/value FLOPs (fwd+bwd), per token."""
    active = count_parameters(config, activated=True, include_mtp=False)
    h, d, w = config.num_attention_heads, config.head_dim, config.sliding_window
    attn = 0
    for t in config.layer_types:
        keys = min(w, seq)
        if t != "sliding_attention":
            m = config.compress_rate(t)
            keys += min(config.index_topk, seq // m) if t == "compressed_sparse_attention" else seq // m
        attn += 2 * 2 * h * d * keys  # scores + weighted sum, forward
    return 6 * active + 3 * attn


def median_time(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_fn(model, ids, kind: str, autocast: bool):
    # the same optimizer for both implementations (fused: the fastest AdamW on CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if kind == "nanoseek":
                loss = model.loss(ids, mtp_weight=0.0, indexer_weight=0.0).loss
            else:
                loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def decode_nanoseek(model, prompt, new_tokens):
    with torch.no_grad():
        cache = model.new_cache(1, prompt.shape[1] + new_tokens + 1)
        logits = model(prompt, cache=cache)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        return new_tokens / (time.perf_counter() - t)


def generate_nanoseek(model, prompt, new_tokens):
    """`nanoseek.generate` with default options (prefill included): seconds."""
    from nanoseek.engine.generate import generate

    ids = prompt[0].tolist()
    t = time.perf_counter()
    out = generate(model, ids, new_tokens, stop_on_eos=False)
    assert len(out) == new_tokens
    return time.perf_counter() - t


def generate_hf(model, prompt, new_tokens):
    """transformers' `generate`, greedy (prefill included): seconds."""
    t = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - t


def generate_rounds(ours, hf, prompt, new_tokens: int, rounds: int) -> dict[str, float]:
    """`nanoseek.generate` (default options) and transformers' `generate` in alternating rounds,
    so that the machine's load drift hits both alike: prints the median tok/s of each and their
    ratio; returns the median seconds of each."""
    generate_nanoseek(ours, prompt, new_tokens)  # compiles the decode step (default options)
    generate_hf(hf, prompt, new_tokens)
    times = {"nanoseek": [], "transformers": []}
    for _ in range(rounds):
        times["nanoseek"].append(generate_nanoseek(ours, prompt, new_tokens))
        times["transformers"].append(generate_hf(hf, prompt, new_tokens))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>12}: generate {new_tokens} tok after {prompt.shape[1]} {new_tokens / med[k]:6.1f} tok/s "
              f"(rounds: {', '.join(f'{new_tokens / t:.1f}' for t in v)})")
    per_round = [h / n for n, h in zip(times["nanoseek"], times["transformers"])]
    print(f"ratio nanoseek/transformers, generate (default options, prefill included), median of {rounds} "
          f"alternating rounds: {med['transformers'] / med['nanoseek']:.2f}x (target 4x); per round "
          f"{min(per_round):.2f}-{max(per_round):.2f}x, median {statistics.median(per_round):.2f}x")
    return med


def bf16_decode_check(model, prompt, new_tokens) -> None:
    """bf16 weights for decoding: speed vs fp32 and the quality cost (logit error on the prompt,
    greedy agreement over new_tokens), eager, the same weights."""
    import copy

    from nanoseek.engine.generate import generate

    half = copy.deepcopy(model).to(torch.bfloat16).eval()
    with torch.no_grad():
        ref, low = model(prompt), half(prompt).float()
    err = (ref - low).abs().max().item() / ref.abs().max().item()
    ids = prompt[0].tolist()
    times = {}
    outs = {}
    for name, m in (("fp32", model), ("bf16", half)):
        t = time.perf_counter()
        outs[name] = generate(m, ids, new_tokens, stop_on_eos=False, compile=False)
        times[name] = time.perf_counter() - t
    agree = next((i for i, (a, b) in enumerate(zip(outs["fp32"], outs["bf16"])) if a != b), new_tokens)
    print(f"bf16 weights (eager): {times['fp32'] / times['bf16']:.2f}x the fp32 speed, max logit error "
          f"{err:.1e} of the largest logit, greedy tokens identical for the first {agree} of {new_tokens}")


def decode_bytes_per_token(config: ModelConfig) -> int:
    """fp32 weight bytes a batch-1 decode step reads: the activated parameters less the
    embedding table (one row is read)."""
    return 4 * (count_parameters(config, activated=True, include_mtp=False) - config.vocab_size * config.hidden_size)


def measure_inference(name: str, model, r: dict, prompt, new_tokens: int, steps: int, single: bool) -> None:
    """Prefill time; for nanoseek the bare eager decode loop and the first `generate` (which
    compiles); `generate` itself here only when one implementation runs (else alternating rounds)."""
    with torch.no_grad():
        if name == "nanoseek":
            r["prefill_s"] = median_time(lambda: model(prompt), 1, steps)
        else:
            r["prefill_s"] = median_time(lambda: model(prompt, use_cache=False), 1, steps)
    if name == "nanoseek":
        r["decode_loop_tok_s"] = decode_nanoseek(model, prompt, new_tokens)  # eager, bare loop
        r["first_generate_s"] = generate_nanoseek(model, prompt, new_tokens)  # compiles (default)
    if single:
        gen = generate_nanoseek if name == "nanoseek" else generate_hf
        r["generate_s"] = median_time(lambda: gen(model, prompt, new_tokens), 1, max(2, steps - 1))


def alternate_steps(step: dict, rounds: int) -> dict[str, list[float]]:
    """`rounds` rounds of two calls of each function, the second one timed; the functions (and
    their optimizers) are freed on return. The untimed call absorbs what the switch costs: with
    glibc's allocator, the heap the other implementation's step left behind (trimmed, or cut up
    into other sizes) is faulted in again by the first step after a switch (timing single
    alternating steps made transformers' bf16 step ~30% slower than back to back), while a
    training run's steps follow one another."""
    times: dict[str, list[float]] = {name: [] for name in step}
    for _ in range(rounds):
        for name, fn in step.items():
            fn()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def measure_training(impls: dict, results: dict, ids, steps: int, run_bf16: bool, fpt: float, peak32: float,
                     peak16: float) -> None:
    """Training step tokens/s, MFU and peak RSS, fp32 and (where bf16 matmuls are native) bf16.

    Peak RSS first: one step of each implementation and precision alone, in the order nanoseek
    fp32, bf16, transformers fp32, bf16, each with its own optimizer, freed after it. Then the
    speed, the implementations alternating (alternate_steps, medians over `steps` rounds): this
    VM's speed drifts by 20-30% within a minute (the same step in one process took 1.46-2.0 s
    in bf16 across five phases), so timing one implementation's steps after the other's
    measures the drift as much as the code."""
    batch, seq = ids.shape
    precisions = [(False, "fp32"), (True, "bf16")] if run_bf16 else [(False, "fp32")]
    for r in results.values():
        if not run_bf16:
            r["train_bf16_tok_s"] = r["train_bf16_mfu"] = r["train_bf16_rss"] = float("nan")
    for name, model in impls.items():
        for autocast, label in precisions:
            results[name][f"train_{label}_rss"] = peak_rss_during(train_step_fn(model, ids, name, autocast))
    for autocast, label in precisions:
        times = alternate_steps({name: train_step_fn(model, ids, name, autocast) for name, model in impls.items()},
                                steps)
        for name, ts in times.items():
            dt = statistics.median(ts)
            results[name][f"train_{label}_tok_s"] = batch * seq / dt
            results[name][f"train_{label}_mfu"] = fpt * batch * seq / dt / (peak16 if autocast else peak32)
        if len(times) == 2:
            per_round = [h / n for n, h in zip(times["nanoseek"], times["transformers"])]
            print(f"train {label}: nanoseek/transformers per round {', '.join(f'{x:.2f}' for x in per_round)}x "
                  f"(nanoseek {' '.join(f'{t:.2f}' for t in times['nanoseek'])} s, "
                  f"transformers {' '.join(f'{t:.2f}' for t in times['transformers'])} s a step)", flush=True)


def print_ratios(a: dict, b: dict, run_bf16: bool) -> None:
    """nanoseek (a) over transformers (b): training (best of fp32 / bf16 on each side), prefill, generate."""

    def best(r):
        return max(x for x in (r["train_fp32_tok_s"], r["train_bf16_tok_s"]) if x == x)

    parts = [f"train {best(a) / best(b):.2f}x best-of-fp32/bf16 (target 2.5x)",
             f"fp32 {a['train_fp32_tok_s'] / b['train_fp32_tok_s']:.2f}x"]
    if run_bf16:
        parts.append(f"bf16 {a['train_bf16_tok_s'] / b['train_bf16_tok_s']:.2f}x")
    parts.append(f"prefill {b['prefill_s'] / a['prefill_s']:.2f}x")
    parts.append(f"generate (default options, prefill included) {b['generate_s'] / a['generate_s']:.2f}x "
                 "(target 4x)")
    print("ratios nanoseek/transformers: " + ", ".join(parts))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["nanoseek", "transformers"], default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast training: auto = only if bf16 matmuls are at least half as fast as fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--bf16-decode", action="store_true",
                    help="also: bf16 weights for decoding, speed and quality cost vs fp32 (eager)")
    ap.add_argument("--generate-only", type=int, metavar="ROUNDS", default=0,
                    help="only `generate` vs transformers' `generate`, in ROUNDS alternating rounds")
    ap.add_argument("--malloc", choices=["keep", "default"], default="default",
                    help="default: glibc's, as a plain script of either library runs (a new user's "
                         "setting); keep: `nanoseek train`'s allocator setting (nanoseek/_runtime.py) for both "
                         "-- it speeds transformers up far more than nanoseek (docs/train.md)")
    args = ap.parse_args()
    if args.generate_only < 0:
        ap.error(f"--generate-only takes a number of rounds >= 1 (got {args.generate_only})")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the trainer's allocator setting (nanoseek/_runtime.py), for both implementations alike
    if args.malloc == "keep":
        keep_freed_memory()
    print(f"allocator: {'freed memory kept for reuse (as nanoseek train)' if args.malloc == 'keep' else 'glibc default'}")
    torch.manual_seed(0)
    batch, seq = (2, 256) if args.quick else (4, 512)
    steps = args.steps or (3 if args.quick else 4)  # (a median of 2 is their mean: one slow step decides)
    new_tokens = 16 if args.quick else 64
    config = ModelConfig.from_preset("small")
    ours = Transformer(config)
    results: dict[str, dict] = {"nanoseek": {}, "transformers": {}}
    impls = {"nanoseek": ours}
    if args.only != "nanoseek":
        hf = in_transformers(ours)
        if hf is None:
            print("transformers not installed: measuring nanoseek only")
        else:
            impls["transformers"] = hf
    if args.only == "transformers":
        impls.pop("nanoseek")
    if args.generate_only:
        if len(impls) < 2:
            raise SystemExit("--generate-only compares with transformers: install it and drop --only")
        prompt = torch.randint(0, config.vocab_size, (1, seq))
        generate_rounds(ours.eval(), impls["transformers"].eval(), prompt, new_tokens, args.generate_only)
        return
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    fpt = train_flops_per_token(config, seq)
    # bf16 autocast only pays off with hardware bf16 matmuls; without them (this 2-core CPU does
    # ~1 GFLOP/s in bf16) a bf16 step takes minutes and measures nothing useful
    run_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and peak16 >= 0.5 * peak32)
    if not run_bf16:
        print(f"bf16 autocast skipped: bf16 matmul peak {peak16 / 1e9:.1f} GFLOP/s vs fp32 {peak32 / 1e9:.1f} "
              "(no hardware bf16 here; --bf16 on forces it)")
    print(f"small config: {count_parameters(config):,} params total, "
          f"{count_parameters(config, activated=True):,} activated; threads={torch.get_num_threads()}")
    print(f"measured matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s; "
          f"training FLOPs/token {fpt / 1e6:.1f} M")
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    prompt = torch.randint(0, config.vocab_size, (1, seq))
    bw = read_bandwidth()
    roof = bw / decode_bytes_per_token(config)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s: batch-1 fp32 decode roofline {roof:.0f} tok/s "
          f"({decode_bytes_per_token(config) / 1e6:.0f} MB of weights per token)")
    # Inference first, on the models as built (identical weights): a training step touches ~3 GB
    # of fresh memory, and on the 2-core VM this benchmark runs on, inference right after it
    # measured 10-40% slower for a while (the same process's user CPU time for the same prefills
    # up ~15%, no other process busy, back to normal after ~20 s idle: the host, not the
    # process's heap -- malloc_trim changed nothing). A memory-bound decode loses more to that
    # than transformers' dispatch-bound one, and a user's `generate` does not run right after
    # ten training steps in one process.
    for name, model in impls.items():
        measure_inference(name, model.eval(), results[name], prompt, new_tokens, steps, single=len(impls) == 1)
    if len(impls) == 2:
        med = generate_rounds(impls["nanoseek"], impls["transformers"], prompt, new_tokens, max(3, 2 * steps - 1))
        for name, t in med.items():
            results[name]["generate_s"] = t
    measure_training({name: model.train() for name, model in impls.items()}, results, ids, steps, run_bf16, fpt,
                     peak32, peak16)
    for name in impls:
        r = results[name]
        extra = (f", bare eager decode loop {r['decode_loop_tok_s']:.1f} tok/s, first generate call "
                 f"{r['first_generate_s']:.1f} s") if name == "nanoseek" else ""
        print(f"{name:>12}: train fp32 {r['train_fp32_tok_s']:7.1f} tok/s (MFU {r['train_fp32_mfu']:.1%}, "
              f"peak RSS {r['train_fp32_rss']:.0f} MiB), bf16 {r['train_bf16_tok_s']:7.1f} tok/s "
              f"(MFU {r['train_bf16_mfu']:.1%}, peak RSS {r['train_bf16_rss']:.0f} MiB); "
              f"prefill {seq} tok {r['prefill_s'] * 1e3:7.1f} ms ({seq / r['prefill_s']:.0f} tok/s){extra}",
              flush=True)
    for name, r in results.items():
        if "generate_s" in r:
            print(f"{name:>12}: generate {new_tokens} tok {new_tokens / r['generate_s']:6.1f} tok/s incl. prefill "
                  f"({new_tokens / r['generate_s'] / roof:.0%} of the decode roofline)")
    if args.bf16_decode and "nanoseek" in impls:
        bf16_decode_check(impls["nanoseek"], prompt, new_tokens)
    if len(impls) == 2:
        print_ratios(results["nanoseek"], results["transformers"], run_bf16)


if __name__ == "__main__":
    main()
