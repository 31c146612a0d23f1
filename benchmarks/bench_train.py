"""Benchmark: the nanoseek training step vs transformers' DeepseekV4ForCausalLM, same process.

Three steps on the same weights and tokens, timed in interleaved rounds so that load from other
processes hits all of them alike:

  transformers  DeepseekV4ForCausalLM forward + backward (CE) + AdamW (fused): the baseline;
  nanoseek      the same work -- CE-only forward + backward + the same fused AdamW -- on
                nanoseek's model: the apples-to-apples model comparison;
  trainer       nanoseek's full trainer step: the V4 objective (CE + MTP + balance + indexer KL),
                gradient clipping, Muon + AdamW (nanoseek.train.optim) and the router-bias
                update, with its time split into forward+backward / Muon / AdamW / rest.

Each step covers one optimizer step's batch: `--config speedrun` (default) is the CPU speedrun's
pre-training -- depth-3 dial model (vocab 4096), 4 accumulation micro-steps of 4 x 256 = 4096
tokens per optimizer step (issue 12's criterion: trainer >= 1x transformers + AdamW);
`--config small` is the `small` preset at one micro-batch of 4 x 512 (the earlier numbers in
docs/train.md). Every step accumulates its micro-batches' gradients, then steps its optimizer.

Precision as `nanoseek train --autocast auto` picks it: on a CPU with native bf16 matmuls both
configs train under bf16 autocast (trainer.use_bf16_autocast; models narrower than the depth
dial's run only their LM head + CE in bf16, trainer.use_bf16_head). Whenever nanoseek's steps run
bf16 products, transformers is timed in fp32 and under bf16 autocast and the faster of the two is
the baseline. Beside the trainer the speedrun's earlier default on such CPUs is timed (fp32 but
for the LM head + CE in bf16), and for a model that takes the bf16 head the step in plain fp32.

Ratios are against transformers; MFU is against a matmul peak measured in the same run (6 x
activated params + attention FLOPs per token; the Muon Newton-Schulz FLOPs are not counted as
useful work).

    python benchmarks/bench_train.py                 # speedrun model and batch (~minutes on 2 cores)
    python benchmarks/bench_train.py --config small  # `small`, batch 4 x 512 (several minutes)
    python benchmarks/bench_train.py --quick         # half the micro-batch, fewer steps
    python benchmarks/bench_train.py --config small --autocast off   # fp32 (auto: bf16 for `small` on
                                                     #   CPUs with native bf16 matmuls, as `nanoseek train`)
    python benchmarks/bench_train.py --threads 1     # robust on a shared machine
    python benchmarks/bench_train.py --malloc keep   # the trainer's allocator setting, for all steps alike
    python benchmarks/bench_train.py --muon-ab       # + Muon step alone: cache-sized Newton-Schulz chunks
                                                     #   vs one batch per shape, and bf16 vs fp32 iterations;
                                                     #   + the trainer step with fp32 iterations

Timings are medians over repeated steps; only ratios measured in one run mean something.
The data loader is not part of the timed step (TokenLoader costs microseconds per batch).
Per-rank Newton-Schulz time at 1 vs 2 processes: benchmarks/bench_muon.py. The
quality-per-compute comparison (vs a dense Llama) is benchmarks/bench_quality.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek._runtime import keep_freed_memory
from nanoseek.train import optim as optim_mod
from nanoseek.train.objectives import PretrainObjective
from nanoseek.train.optim import OptimConfig, build_optimizer
from nanoseek.train.trainer import use_bf16_autocast, use_bf16_head
from nanoseek.train.metrics import measure_peak_flops, training_flops_per_token


def trainer_step(model, micro: list[torch.Tensor], phases: dict[str, list[float]], ns_dtype: str = "auto",
                 bf16: bool = False):
    """The trainer loop's step body (nanoseek/train/trainer.py train_step) for one optimizer
    step over `micro` micro-batches (gradient accumulation), timed by phase."""
    opt = build_optimizer(model, OptimConfig(lr=1e-3, ns_dtype=ns_dtype))
    muon, adamw = opt.optimizers
    objective = PretrainObjective(balance_alpha=1e-4, indexer_weight=1.0)

    def step():
        t0 = time.perf_counter()
        metrics = []
        for ids in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):   # (as the trainer's run.autocast)
                terms = objective(model, {"input_ids": ids}, {"mtp_weight": 0.3, "step": 0})
            (terms["loss"] / len(micro)).backward()
            metrics.append(terms)
        t1 = time.perf_counter()
        loads = torch.stack([m.load for m in model.moe_layers() if not m.is_hash])  # the trainer's all-reduce input
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t2 = time.perf_counter()
        muon.step()
        t3 = time.perf_counter()
        adamw.step()
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(1e-3)
        [float(v.detach()) for terms in metrics for v in terms.values()], loads.tolist()  # the metrics sync
        t5 = time.perf_counter()
        for k, v in (("fwd+bwd", t1 - t0), ("muon", t3 - t2), ("adamw", t4 - t3), ("rest", t2 - t1 + t5 - t4)):
            phases.setdefault(k, []).append(v)

    return step


def adamw_step(model, micro: list[torch.Tensor], kind: str, bf16: bool = False):
    """CE-only forward + backward over the micro-batches + fused AdamW: the same work for both
    implementations."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        for ids in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if kind == "nanoseek":
                    loss = model.loss(ids, mtp_weight=0.0, balance_alpha=0.0, indexer_weight=0.0).loss
                else:
                    loss = model(ids, labels=ids).loss
            (loss / len(micro)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def with_head(model, head: bool):
    """The model with its loss's LM head + CE in bf16 when `head` (the trainer's "head" precision)."""
    model.head_dtype = torch.bfloat16 if head else None
    return model


def head_note(head: bool) -> str:
    return ", nanoseek's LM head + CE in bf16 (trainer.use_bf16_head)" if head else ""


def muon_only(model, chunk_bytes: int, ns_dtype: str = "auto"):
    """One Muon step over the model's matrices with fixed random gradients."""
    params = [p for _, p in optim_mod.group_parameters(model)["muon"]]
    grads = [torch.randn_like(p) for p in params]
    muon = optim_mod.Muon(params, lr=0.0, weight_decay=0.0, ns_dtype=ns_dtype)  # lr 0: keep the weights

    def step():
        saved = optim_mod.NS_CPU_CHUNK_BYTES
        optim_mod.NS_CPU_CHUNK_BYTES = chunk_bytes
        try:
            for p, g in zip(params, grads):
                p.grad = g
            muon.step()
        finally:
            optim_mod.NS_CPU_CHUNK_BYTES = saved
            for p in params:
                p.grad = None

    return step


def interleaved_medians(fns: dict, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (one call each per round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_config(name: str, quick: bool) -> tuple[ModelConfig, int, int, int]:
    """(model config, micro-batch rows, sequence length, accumulation micro-steps)."""
    if name == "speedrun":   # nanoseek/train/speedrun.py on CPU: depth 3, seq 256, micro 4, 4096 tokens/step
        from nanoseek.train.presets import scaled_model_config

        return scaled_model_config(depth=3, vocab_size=4096, seq_len=256), 4, 256, 1 if quick else 4
    return ModelConfig.from_preset("small"), *((2, 256) if quick else (4, 512)), 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["speedrun", "small"], default="speedrun")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["nanoseek", "transformers"], default=None)
    ap.add_argument("--malloc", choices=["keep", "default"], default="default",
                    help="keep: glibc keeps freed memory for reuse, as `nanoseek train` sets for its process "
                         "(nanoseek/_runtime.py), for every step timed here alike; default: glibc's defaults")
    ap.add_argument("--autocast", choices=["auto", "bf16", "head", "off"], default="auto",
                    help="bf16 autocast for every step timed, or the LM head alone in bf16 for nanoseek's steps, "
                         "as `nanoseek train --autocast` (auto: the trainer's choice for this model and machine, "
                         "trainer.use_bf16_autocast / use_bf16_head)")
    ap.add_argument("--muon-ab", action="store_true",
                    help="also time a Muon step alone: one whole-bucket Newton-Schulz batch vs the default "
                         "chunks, and fp32 vs bf16 iterations")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        keep_freed_memory()
    config, batch, seq, accum = bench_config(args.config, args.quick)
    reps = args.steps or (2 if args.quick else 3)
    torch.manual_seed(0)
    micro = [torch.randint(0, config.vocab_size, (batch, seq)) for _ in range(accum)]
    bf16 = use_bf16_autocast(args.autocast, torch.device("cpu"), config)
    head = not bf16 and use_bf16_head(args.autocast, torch.device("cpu"), config)
    # MFU against the peak of the dtype the matmuls run in
    peak = measure_peak_flops(torch.device("cpu"), torch.bfloat16 if bf16 else torch.float32, seconds=1.0)
    probe = Transformer(config)
    fpt = training_flops_per_token(probe, seq)
    ns_dtype = optim_mod.ns_compute_dtype("auto", torch.device("cpu"))
    print(f"{args.config}: {accum} x micro-batch {batch} x {seq} = {accum * batch * seq} tokens/step, threads "
          f"{torch.get_num_threads()}, {'bf16' if bf16 else 'fp32'} matmul peak {peak / 1e9:.1f} GFLOP/s, {fpt / 1e6:.1f} MFLOP/token "
          f"(6 x activated params + attention); Muon Newton-Schulz in {str(ns_dtype).removeprefix('torch.')} "
          f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); every step {'under bf16 autocast' if bf16 else 'in fp32'}{head_note(head)}; allocator: "
          f"{'freed memory kept (as nanoseek train), for every step alike' if args.malloc == 'keep' else 'glibc default'}")

    fns, phases = {}, {}
    if args.only != "transformers":
        torch.manual_seed(0)
        fns["trainer"] = trainer_step(with_head(Transformer(config).train(), head), micro, phases, bf16=bf16)
        fns["nanoseek"] = adamw_step(with_head(probe.train(), head), micro, "nanoseek", bf16)
        if head:   # the trainer as it was before "auto" chose the bf16 head here
            torch.manual_seed(0)
            fns["trainer fp32 head"] = trainer_step(Transformer(config).train(), micro, {}, bf16=False)
        if bf16 and args.config == "speedrun":   # ... and before "auto" chose bf16 autocast at its width
            torch.manual_seed(0)
            fns["trainer bf16 head"] = trainer_step(with_head(Transformer(config).train(), True), micro, {})
    if args.only != "nanoseek":
        from bench_model import in_transformers  # benchmarks/ is the script's directory

        hf = in_transformers(probe)
        if hf is None:
            print("transformers not installed: baseline skipped")
        else:
            fns["transformers"] = adamw_step(hf.train(), micro, "transformers", False)
            if head or bf16:   # nanoseek runs bf16 products: transformers gets its bf16 autocast too, the better counts
                fns["transformers bf16"] = adamw_step(hf, micro, "transformers", True)
    if args.muon_ab and args.only != "transformers":
        if ns_dtype != torch.float32:       # the trainer as it was before "auto" chose bf16 here
            torch.manual_seed(0)
            fns["trainer fp32 NS"] = trainer_step(with_head(Transformer(config).train(), head), micro, {}, "float32",
                                                  bf16)
        fns["muon chunked"] = muon_only(probe, optim_mod.NS_CPU_CHUNK_BYTES)
        fns["muon one batch"] = muon_only(probe, 1 << 62)
        fns["muon fp32"] = muon_only(probe, optim_mod.NS_CPU_CHUNK_BYTES, "float32")
        fns["muon bf16"] = muon_only(probe, optim_mod.NS_CPU_CHUNK_BYTES, "bfloat16")
    dt = interleaved_medians(fns, warmup=1, reps=reps)
    if "transformers bf16" in dt:
        print(f"transformers + AdamW: fp32 {dt['transformers']:.2f} s/step, bf16 autocast "
              f"{dt['transformers bf16']:.2f} s/step: the faster is the baseline")
        dt["transformers"] = min(dt["transformers"], dt.pop("transformers bf16"))
    phases = {k: statistics.median(v[-reps:]) for k, v in phases.items()}
    report(dt, phases, accum * batch * seq, fpt, peak)


def report(dt: dict[str, float], phases: dict[str, float], tok: int, fpt: float, peak: float) -> None:
    base = dt.get("transformers")

    def line(label: str, key: str) -> None:
        r = f", {base / dt[key]:.2f}x transformers" if base and key != "transformers" else ""
        print(f"{label:<58} {tok / dt[key]:8.1f} tok/s  {dt[key]:6.2f} s/step  MFU {fpt * tok / dt[key] / peak:5.1%}{r}")

    print()
    if "transformers" in dt:
        line("transformers: fwd+bwd (CE) + AdamW", "transformers")
    if "nanoseek" in dt:
        line("nanoseek model: fwd+bwd (CE) + AdamW  [same work]" + (", bf16 head" if "trainer fp32 head" in dt else ""),
             "nanoseek")
        line("nanoseek trainer: V4 objective + clip + Muon/AdamW + bias", "trainer")
        if "trainer fp32 head" in dt:
            line("  the same, the LM head in fp32 instead of bf16", "trainer fp32 head")
        if "trainer bf16 head" in dt:
            line("  the same in fp32 but for the LM head + CE (bf16 head)", "trainer bf16 head")
        if "trainer fp32 NS" in dt:
            line("  the same, Newton-Schulz in fp32 instead of bf16", "trainer fp32 NS")
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in phases.items())
        print(f"  trainer step split (medians): {parts}")
        if "muon chunked" in dt:
            print(f"  Muon step alone: cache-sized Newton-Schulz chunks {dt['muon chunked']:.3f} s, one batch per "
                  f"shape {dt['muon one batch']:.3f} s ({dt['muon one batch'] / dt['muon chunked']:.2f}x); "
                  f"fp32 iterations {dt['muon fp32']:.3f} s, bf16 {dt['muon bf16']:.3f} s "
                  f"({dt['muon fp32'] / dt['muon bf16']:.2f}x faster in bf16)")
    if base and "trainer" in dt:
        print(f"ratio nanoseek/transformers: model+AdamW {base / dt['nanoseek']:.2f}x, "
              f"full trainer step {base / dt['trainer']:.2f}x (target >= 1x)")


if __name__ == "__main__":
    main()
