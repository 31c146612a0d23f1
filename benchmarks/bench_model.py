"""Benchmark: nanoseek vs transformers' DeepseekV4ForCausalLM on the `small` config, same process.

Measures, for both implementations on identical weights:
  * training step tokens/s at batch 4 x seq 512 (forward + backward + AdamW), fp32 and bf16 autocast
  * prefill time of a 512-token prompt (batch 1)
  * batch-1 decode tokens/s after a 512-token prompt (greedy, cached)
and prints nanoseek/transformers ratios and MFU against a matmul peak measured in the same run.

    python benchmarks/bench_model.py                 # full run (~10 min on 2 cores)
    python benchmarks/bench_model.py --quick         # fewer steps, shorter sequences
    python benchmarks/bench_model.py --only nanoseek  # skip transformers

The machines are noisy: timings are medians over repeated steps, and only ratios measured in
the same run are meaningful.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from nanoseek import ModelConfig, Transformer
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


def decode_hf(model, prompt, new_tokens):
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["nanoseek", "transformers"], default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast training: auto = only if bf16 matmuls are at least half as fast as fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, seq = (2, 256) if args.quick else (4, 512)
    steps = args.steps or (2 if args.quick else 4)
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
    for name, model in impls.items():
        r = results[name]
        model.train()
        for autocast, label in ((False, "fp32"), (True, "bf16")):
            if autocast and not run_bf16:
                r[f"train_{label}_tok_s"], r[f"train_{label}_mfu"] = float("nan"), float("nan")
                continue
            dt = median_time(train_step_fn(model, ids, name, autocast), warmup=1, reps=steps)
            r[f"train_{label}_tok_s"] = batch * seq / dt
            r[f"train_{label}_mfu"] = fpt * batch * seq / dt / (peak16 if autocast else peak32)
        model.eval()
        with torch.no_grad():
            if name == "nanoseek":
                r["prefill_s"] = median_time(lambda: model(prompt), 1, steps)
            else:
                r["prefill_s"] = median_time(lambda: model(prompt, use_cache=False), 1, steps)
        r["decode_tok_s"] = (decode_nanoseek if name == "nanoseek" else decode_hf)(model, prompt, new_tokens)
        print(f"{name:>12}: train fp32 {r['train_fp32_tok_s']:7.1f} tok/s (MFU {r['train_fp32_mfu']:.1%}), "
              f"bf16 {r['train_bf16_tok_s']:7.1f} tok/s (MFU {r['train_bf16_mfu']:.1%}), "
              f"prefill {seq} tok {r['prefill_s'] * 1e3:7.1f} ms, decode {r['decode_tok_s']:6.1f} tok/s", flush=True)
    if len(impls) == 2:
        a, b = results["nanoseek"], results["transformers"]
        parts = [f"train fp32 {a['train_fp32_tok_s'] / b['train_fp32_tok_s']:.2f}x (target 2.5x)"]
        if run_bf16:
            parts.append(f"train bf16 {a['train_bf16_tok_s'] / b['train_bf16_tok_s']:.2f}x")
        parts.append(f"prefill {b['prefill_s'] / a['prefill_s']:.2f}x")
        parts.append(f"decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x (target 4x)")
        print("ratios nanoseek/transformers: " + ", ".join(parts))


if __name__ == "__main__":
    main()
