"""Benchmark: RL and on-policy distillation throughput -- engine rollouts vs transformers' `generate`,
the GRPO step's time split, and distillation tokens/s.

One run prints three parts, all on the same CPU-sized model (default: a random-init depth-3
model, presets.scaled_model_config, with a 2K-token BPE trained on this interpreter's stdlib in
--work; or --model DIR, e.g. runs/speedrun/sft/model):

  1. rollouts -- P prompts x G samples x M new tokens, temperature 1, no top-k / top-p:
       nanoseek      train.rollouts.sample_rollouts (the engine's BatchRunner, continuous
                     batching, per-row seeded sampler with log-probs: exactly what RL calls);
       transformers  DeepseekV4ForCausalLM.generate(do_sample=True, num_return_sequences=G) on
                     the same weights (bench_model.in_transformers), the baseline.
     Both make exactly M tokens per row (EOS switched off: the model's eos_token_id is None
     for nanoseek, min_new_tokens=M for transformers), from the same P prompts (the P shortest
     HumanEval prompts, cut to a common token length so transformers needs no padding). Runs
     alternate between the two; printed: generated tokens/s (prefill included, for both), the
     nanoseek/transformers ratio, and the share of the decode memory-bandwidth roofline:
     weight bytes a decode step of B = P x G rows must read (non-expert weights + the routed
     experts that B rows touch, E(1 - (1 - k/E)^B) per MoE layer under uniform routing; the
     embedding table and MTP excluded, the KV cache ignored) / copy bandwidth measured in the
     same run, against the measured seconds per step. A model whose weights fit in the CPU
     caches is not bandwidth-bound: a small share then says "overhead", not "slow memory".
  2. RL step split -- `train.trainer.train` with `train.rl.RLObjective` for --steps steps on
     the same HumanEval prompts, with a plug-in reward (a string count: scoring costs ~0) and
     with the built-in code reward (each completion runs the problem's tests in the sandbox,
     overlapping the rows still decoding). From metrics.jsonl (first step dropped, medians):
     generation (rollouts), scoring (the wait for rewards after the last row finished), other
     data work, update (loss forward + backward + optimizer = dt - data_s) in seconds and
     shares of the step, rollout tokens/s, and the update's MFU (6 x activated params +
     attention FLOPs per row token, prompts included) against a matmul peak measured once.
  3. distillation -- `train.distill.DistillObjective`, P x G prompts per step, one sample each,
     one teacher (a random depth+1 model with the same tokenizer; with --model, the model
     itself; or --teacher DIR):
     student rollout tokens/s, teacher scoring seconds, update seconds, and completion
     tokens/s of the whole step.

    python benchmarks/bench_rl.py --quick --threads 1        # P=2, G=4, M=32: ~30 s
    python benchmarks/bench_rl.py --threads 1                # P=4, G=8, M=128, 6 steps
    python benchmarks/bench_rl.py --model runs/speedrun/sft/model --protocol chat --threads 1

--threads 1 on a shared machine: with two intra-op threads on two busy cores, OpenMP's spinning
made every part ~10x slower (and noisier) in a test run here.

Timings are medians; only ratios and shares measured in the same run mean something.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

REWARD = "def share_a(task, completion):\n    return completion.count('a') / max(1, len(completion))\n"


# ------------------------------------------------------------------------------------ set-up
def build_models(work: Path, depth: int, vocab: int) -> tuple[Path, Path]:
    """(student dir, teacher dir): random-init models (depth, depth + 1) sharing a BPE tokenizer
    trained on a 1 MB stdlib corpus; the corpus and tokenizer stages are reused across runs."""
    from nanoseek import Transformer
    from nanoseek.data.build import build_corpus
    from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
    from nanoseek.train.export import write_model_dir
    from nanoseek.train.presets import scaled_model_config

    build_corpus(work / "corpus", ["default"], workers=1, max_mb=1.0, progress=False, check_inputs=False)  # (a finished one is kept: its tokenizer was made from it)
    train_tokenizer(work / "corpus", vocab, work / "tokenizer", progress=False)
    tok = load_tokenizer(work / "tokenizer")
    dirs = []
    for name, d in (("student", depth), ("teacher", depth + 1)):
        torch.manual_seed(d)
        # seq_len only sets the attention geometry (window, compression rates, index top-k)
        model = Transformer(scaled_model_config(d, tok.vocab_size, seq_len=256))
        dirs.append(write_model_dir(model, tok, work / name))
    return dirs[0], dirs[1]


def write_tasks(work: Path, n: int) -> tuple[Path, list[dict]]:
    """The n shortest HumanEval problems as an RL tasks file (they carry entry_point and test,
    so the code reward can run them); short prompts keep the CPU's prefill and update small."""
    from nanoseek.eval.humaneval import load_problems

    probs = sorted(load_problems().values(), key=lambda p: len(p["prompt"]))[:n]
    path = work / "tasks.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probs), encoding="utf-8")
    return path, probs


def equal_length_prompts(tok, texts: list[str], cap: int = 128) -> list[list[int]]:
    """The prompts' token ids cut to one common length (the shortest, at most `cap`), so that
    transformers' batched generate needs neither padding nor an attention mask."""
    ids = [tok.encode(t, add_bos=True) for t in texts]
    n = min(cap, *(len(x) for x in ids))
    return [x[:n] for x in ids]


# ------------------------------------------------------------------------- rollouts vs transformers
def copy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Memory bandwidth in bytes/s: a large tensor copy reads and writes mib MiB each (median)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times)


def decode_step_bytes(model, rows: int) -> tuple[float, float]:
    """(weight bytes one token's decode reads, bytes a step of `rows` rows reads): routed
    experts count k/E of their tensors for one token and E(1 - (1 - k/E)^rows)/E for `rows`
    rows (uniform routing); the embedding is a lookup and MTP does not run in plain decoding."""
    c = model.config
    E, k = c.n_routed_experts, c.num_experts_per_tok
    touched = E * (1 - (1 - k / E) ** rows)
    one = many = 0.0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "embed.weight":
            continue
        b = p.numel() * p.element_size()
        if ".experts.w" in name:
            one += b * k / E
            many += b * touched / E
        else:
            one += b
            many += b
    return one, many


@contextlib.contextmanager
def eos_off(model):
    """sample_rollouts stops a row at model.config.eos_token_id; None makes every row run to M."""
    eos = model.config.eos_token_id
    model.config.eos_token_id = None
    try:
        yield
    finally:
        model.config.eos_token_id = eos


def bench_rollouts(model, tok, prompts: list[list[int]], G: int, M: int, reps: int) -> dict:
    """Median generated tokens/s of sample_rollouts and of transformers' generate, interleaved."""
    from nanoseek.train.rollouts import sample_rollouts

    from bench_model import in_transformers  # benchmarks/ is the script's directory

    rows = len(prompts) * G

    def ours(seed: int) -> float:
        t = time.perf_counter()
        with eos_off(model):
            outs = sample_rollouts(model, tok, prompts, n=G, max_new_tokens=M, temperature=1.0, seed=seed)
        dt = time.perf_counter() - t
        assert all(len(r.tokens) == M for r in outs), "a row stopped early: the work would not compare"
        return rows * M / dt

    hf = in_transformers(model)
    ids = torch.tensor(prompts)

    def theirs(seed: int) -> float:
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, num_return_sequences=G, max_new_tokens=M, min_new_tokens=M,
                              pad_token_id=tok.pad_id)
        dt = time.perf_counter() - t
        assert out.shape == (rows, ids.shape[1] + M), out.shape
        return rows * M / dt

    fns = {"nanoseek": ours} if hf is None else {"nanoseek": ours, "transformers": theirs}
    for fn in fns.values():   # warm-up: first-call allocations, lazy imports
        fn(0)
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):     # alternate, so that load from other processes hits both alike
        for k, fn in fns.items():
            runs[k].append(fn(1 + r))
    return {k: statistics.median(v) for k, v in runs.items()} | {"runs": runs}


def print_rollouts(res: dict, model, P: int, G: int, M: int, L: int, bw: float) -> None:
    rows = P * G
    one, many = decode_step_bytes(model, rows)
    print(f"\n1. rollouts: {P} prompts x {G} samples = {rows} rows, prompt {L} tokens, {M} new tokens each "
          f"(EOS off), temperature 1")
    print(f"   decode step weight reads: {many / 2**20:.2f} MiB for {rows} rows ({one / 2**20:.2f} MiB for one token); "
          f"copy bandwidth {bw / 1e9:.1f} GB/s -> roofline {rows * bw / many:,.0f} tok/s")
    for k in ("nanoseek", "transformers"):
        if k in res:
            rate = res[k]
            share = rate / rows * many / bw      # (bytes / bandwidth) / measured seconds per step
            runs = ", ".join(f"{x:.0f}" for x in res["runs"][k])
            print(f"   {k:<13} {rate:8.1f} tok/s   roofline share {share:6.2%}   (runs: {runs})")
    if "transformers" in res:
        print(f"   ratio nanoseek / transformers: {res['nanoseek'] / res['transformers']:.2f}x")
    else:
        print("   transformers not installed: baseline skipped")


# --------------------------------------------------------------------------------- trainer runs
def step_records(run_dir: Path) -> list[dict]:
    """The per-step records of metrics.jsonl without the first (its time includes warm-up)."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "loss" in r and "event" not in r]
    return steps[1:] if len(steps) > 1 else steps


def med(recs: list[dict], key: str) -> float:
    return statistics.median(float(r.get(key, 0.0)) for r in recs)


def loop_kwargs(args) -> dict:
    # one matmul peak for every run (args.peak_tflops, measured once), so their MFUs compare
    return dict(max_steps=args.steps, eval_every=0, ckpt_every=0, progress=False, tensorboard=False,
                export_model=False, peak_tflops=args.peak_tflops)


def bench_rl_step(model_dir: Path, tasks: Path, reward: str, args, work: Path, name: str) -> None:
    from nanoseek.train.rl import RLConfig, RLObjective, rl_train_config
    from nanoseek.train.trainer import train

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    rl = RLConfig(tasks=str(tasks), reward=reward, protocol=args.protocol, group_size=args.group_size,
                  prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens)
    train(rl_train_config(str(model_dir), str(out), rl, **loop_kwargs(args)), RLObjective(rl))
    recs = step_records(out)
    dt, data = med(recs, "dt"), med(recs, "data_s")
    gen, score = med(recs, "generation_s"), med(recs, "scoring_wait_s")
    update = dt - data
    other = max(0.0, data - gen - score)
    mfu = statistics.median(r["mfu"] * r["dt"] / max(r["dt"] - r["data_s"], 1e-9) for r in recs)
    print(f"   {name:<12} step {dt:6.2f} s = generation {gen:6.2f} s ({gen / dt:4.0%}) + scoring wait {score:5.2f} s "
          f"({score / dt:4.0%}) + other data {other:4.2f} s ({other / dt:4.0%}) + update {update:5.2f} s "
          f"({update / dt:4.0%})")
    print(f"   {'':<12} rollout {med(recs, 'rollout_tok_per_s'):7.1f} tok/s, response {med(recs, 'response_len'):5.1f} "
          f"tokens, reward {med(recs, 'reward'):.3f}, update MFU {mfu:.2%}")


def bench_distill(model_dir: Path, teacher_dir: Path, tasks: Path, args, work: Path) -> None:
    from nanoseek.train.distill import DistillConfig, DistillObjective, distill_train_config
    from nanoseek.train.trainer import train

    out = work / "distill"
    shutil.rmtree(out, ignore_errors=True)
    rows = args.prompts * args.group_size    # the RL step's rows, one sample per prompt
    dc = DistillConfig(prompts=str(tasks), teachers=[str(teacher_dir)], prompts_per_step=rows,
                       max_new_tokens=args.max_new_tokens)
    train(distill_train_config(str(model_dir), str(out), **loop_kwargs(args)), DistillObjective(dc))
    recs = step_records(out)
    dt, data = med(recs, "dt"), med(recs, "data_s")
    gen, teach = med(recs, "generation_s"), med(recs, "teacher_s")
    update = dt - data
    completion = statistics.median(r["response_len"] * rows / r["dt"] for r in recs)
    print(f"\n3. distillation: {rows} prompts x 1 sample x <= {args.max_new_tokens} tokens per step, "
          f"teacher {teacher_dir}")
    print(f"   step {dt:6.2f} s = student rollouts {gen:6.2f} s ({gen / dt:4.0%}) + teacher scoring {teach:5.2f} s "
          f"({teach / dt:4.0%}) + update {update:5.2f} s ({update / dt:4.0%})")
    print(f"   student rollout {med(recs, 'rollout_tok_per_s'):7.1f} tok/s; whole step {completion:7.1f} completion "
          f"tok/s ({med(recs, 'tok_per_s'):7.1f} row tok/s incl. prompts)")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/nanoseek_bench_rl", help="corpus, tokenizer, models and runs (reused)")
    ap.add_argument("--model", default=None, help="benchmark this model directory (with tokenizer) instead")
    ap.add_argument("--teacher", default=None,
                    help="distillation teacher dir (default: a random depth+1 model, or --model itself)")
    ap.add_argument("--depth", type=int, default=3, help="the built model's depth (without --model)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step P (default 4, --quick 2)")
    ap.add_argument("--group-size", type=int, default=None, help="samples per prompt G (default 8, --quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="M (default 128, --quick 32)")
    ap.add_argument("--steps", type=int, default=None,
                    help="trainer steps per run; the first is dropped (default 6, --quick 4)")
    ap.add_argument("--reps", type=int, default=3, help="timed rollout rounds")
    ap.add_argument("--protocol", choices=["completion", "chat"], default="completion",
                    help="RL prompt protocol (chat for an SFT model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    q = args.quick
    args.prompts = args.prompts or (2 if q else 4)
    args.group_size = args.group_size or (4 if q else 8)
    args.max_new_tokens = args.max_new_tokens or (32 if q else 128)
    args.steps = args.steps or (4 if q else 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    from nanoseek.engine.loading import load_model_and_tokenizer
    from nanoseek.train.metrics import measure_peak_flops

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = Path(args.model)
        teacher_dir = Path(args.teacher or args.model)
    else:
        model_dir, teacher_dir = build_models(work, args.depth, 2048)
        teacher_dir = Path(args.teacher) if args.teacher else teacher_dir
    model, tok = load_model_and_tokenizer(model_dir)
    tasks, probs = write_tasks(work, max(16, 4 * args.prompts))
    (work / "reward.py").write_text(REWARD)
    P, G, M = args.prompts, args.group_size, args.max_new_tokens
    print(f"model {model_dir}: {model.num_parameters():,} params, {model.num_parameters(activated=True):,} activated; "
          f"vocab {tok.vocab_size}; threads {torch.get_num_threads()}")

    prompts = equal_length_prompts(tok, [p["prompt"] for p in probs[:P]])
    bw = copy_bandwidth(128 if q else 256)
    res = bench_rollouts(model, tok, prompts, G, M, args.reps)
    print_rollouts(res, model, P, G, M, len(prompts[0]), bw)
    del model

    args.peak_tflops = measure_peak_flops(torch.device("cpu"), seconds=1.0) / 1e12
    print(f"\n2. RL step (GRPO, {P} prompts x {G} samples, <= {M} tokens, protocol {args.protocol}; medians of "
          f"{args.steps - 1} steps): time split; update MFU vs a {args.peak_tflops * 1e3:.0f} GFLOP/s matmul peak")
    bench_rl_step(model_dir, tasks, f"{work / 'reward.py'}:share_a", args, work, "rl_plugin")
    bench_rl_step(model_dir, tasks, "code", args, work, "rl_code")
    bench_distill(model_dir, teacher_dir, tasks, args, work)


if __name__ == "__main__":
    main()
