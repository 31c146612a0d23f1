"""Benchmark: the nanoseek training step vs transformers' DeepseekV4ForCausalLM, same process.

Three steps on the `small` config (batch 4 x 512, identical weights and tokens), timed in
interleaved rounds so that load from other processes hits all of them alike:

  transformers  DeepseekV4ForCausalLM forward + backward (CE) + AdamW (fused): the baseline, the
                issue's "about 470 tok/s fp32" reference;
  nanoseek      the same work -- CE-only forward + backward + the same fused AdamW -- on
                nanoseek's model: the apples-to-apples model comparison;
  trainer       nanoseek's full trainer step: the V4 objective (CE + MTP + balance + indexer KL),
                gradient clipping, Muon + AdamW (nanoseek.train.optim) and the router-bias
                update, with its time split into forward+backward / Muon / AdamW / rest.

Ratios are against transformers (target 2.5x for the trainer step); MFU is against a matmul
peak measured in the same run (6 x activated params + attention FLOPs per token; the Muon
Newton-Schulz FLOPs are not counted as useful work).

    python benchmarks/bench_train.py                 # `small`, batch 4 x 512 (several minutes on 2 cores)
    python benchmarks/bench_train.py --quick         # batch 2 x 256, fewer steps
    python benchmarks/bench_train.py --threads 1     # robust on a shared machine
    python benchmarks/bench_train.py --muon-ab       # + Muon step with one whole-bucket Newton-Schulz
                                                     #   batch vs the default cache-sized chunks

Timings are medians over repeated steps; only ratios measured in one run mean something.
The data loader is not part of the timed step (TokenLoader costs microseconds per batch).
The quality-per-compute comparison (vs a dense Llama) is benchmarks/bench_quality.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train import optim as optim_mod
from nanoseek.train.objectives import PretrainObjective
from nanoseek.train.optim import OptimConfig, build_optimizer
from nanoseek.train.metrics import measure_peak_flops, training_flops_per_token


def trainer_step(model, ids, phases: dict[str, list[float]]):
    """The trainer loop's step body (nanoseek/train/trainer.py) for one micro-batch, timed by phase."""
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    muon, adamw = opt.optimizers
    objective = PretrainObjective(balance_alpha=1e-4, indexer_weight=1.0)
    batch = {"input_ids": ids}

    def step():
        t0 = time.perf_counter()
        terms = objective(model, batch, {"mtp_weight": 0.3, "step": 0})
        terms["loss"].backward()
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
        [float(v.detach()) for v in terms.values()], loads.tolist()                 # the trainer's metrics sync
        t5 = time.perf_counter()
        for k, v in (("fwd+bwd", t1 - t0), ("muon", t3 - t2), ("adamw", t4 - t3), ("rest", t2 - t1 + t5 - t4)):
            phases.setdefault(k, []).append(v)

    return step


def adamw_step(model, ids, kind: str):
    """CE-only forward + backward + fused AdamW: the same work for both implementations."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        if kind == "nanoseek":
            loss = model.loss(ids, mtp_weight=0.0, balance_alpha=0.0, indexer_weight=0.0).loss
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def muon_only(model, chunk_bytes: int):
    """One Muon step over the model's matrices with fixed random gradients."""
    params = [p for _, p in optim_mod.group_parameters(model)["muon"]]
    grads = [torch.randn_like(p) for p in params]
    muon = optim_mod.Muon(params, lr=0.0, weight_decay=0.0)   # lr 0: time the work, keep the weights

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["nanoseek", "transformers"], default=None)
    ap.add_argument("--muon-ab", action="store_true",
                    help="also time a Muon step with one whole-bucket Newton-Schulz batch vs the default chunks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, seq = (2, 256) if args.quick else (4, 512)
    reps = args.steps or (2 if args.quick else 3)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=1.0)
    probe = Transformer(config)
    fpt = training_flops_per_token(probe, seq)
    print(f"small: batch {batch} x {seq}, threads {torch.get_num_threads()}, fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s, {fpt / 1e6:.1f} MFLOP/token (6 x activated params + attention)")

    fns, phases = {}, {}
    if args.only != "transformers":
        torch.manual_seed(0)
        fns["trainer"] = trainer_step(Transformer(config).train(), ids, phases)
        fns["nanoseek"] = adamw_step(probe.train(), ids, "nanoseek")
    if args.only != "nanoseek":
        from bench_model import in_transformers  # benchmarks/ is the script's directory

        hf = in_transformers(probe)
        if hf is None:
            print("transformers not installed: baseline skipped")
        else:
            fns["transformers"] = adamw_step(hf.train(), ids, "transformers")
    if args.muon_ab and args.only != "transformers":
        fns["muon chunked"] = muon_only(probe, optim_mod.NS_CPU_CHUNK_BYTES)
        fns["muon one batch"] = muon_only(probe, 1 << 62)
    dt = interleaved_medians(fns, warmup=1, reps=reps)
    phases = {k: statistics.median(v[-reps:]) for k, v in phases.items()}

    tok = batch * seq
    base = dt.get("transformers")

    def line(label: str, key: str) -> None:
        r = f", {base / dt[key]:.2f}x transformers" if base and key != "transformers" else ""
        print(f"{label:<58} {tok / dt[key]:8.1f} tok/s  {dt[key]:6.2f} s/step  MFU {fpt * tok / dt[key] / peak:5.1%}{r}")

    print()
    if "transformers" in dt:
        line("transformers: fwd+bwd (CE) + AdamW", "transformers")
    if "nanoseek" in dt:
        line("nanoseek model: fwd+bwd (CE) + AdamW  [same work]", "nanoseek")
        line("nanoseek trainer: V4 objective + clip + Muon/AdamW + bias", "trainer")
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
        print(f"  trainer step split (medians): {parts}")
        if "muon chunked" in dt:
            print(f"  Muon step alone: cache-sized Newton-Schulz chunks {dt['muon chunked']:.2f} s, one batch per "
                  f"shape {dt['muon one batch']:.2f} s ({dt['muon one batch'] / dt['muon chunked']:.2f}x)")
    if base and "trainer" in dt:
        print(f"ratio nanoseek/transformers: model+AdamW {base / dt['nanoseek']:.2f}x, "
              f"full trainer step {base / dt['trainer']:.2f}x (target 2.5x)")


if __name__ == "__main__":
    main()
