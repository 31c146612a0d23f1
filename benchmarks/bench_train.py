"""Benchmark: one nanoseek training step vs transformers' DeepseekV4ForCausalLM, same process.

nanoseek's step is the trainer's: the full V4 objective (CE + MTP + balance + indexer KL),
gradient clipping, Muon + AdamW (nanoseek.train.optim) and the router-bias update. The
baseline is transformers' model on the same weights with forward + backward + AdamW (fused),
i.e. the issue's "about 470 tok/s fp32" reference; target ratio >= 2.5x.

    python benchmarks/bench_train.py                 # `small`, batch 4 x 512 (several minutes on 2 cores)
    python benchmarks/bench_train.py --quick         # batch 2 x 256, fewer steps
    python benchmarks/bench_train.py --threads 1

Timings are medians over repeated steps; the machines are shared and noisy, so only the
ratio measured in one run means something. The data loader is not part of the timed step
(TokenLoader costs microseconds per batch). Not measured here (see docs/train.md): the
quality-per-compute comparison against a dense Llama model.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train.optim import OptimConfig, build_optimizer
from nanoseek.train.trainer import measure_peak_flops, training_flops_per_token

from bench_model import median_time  # benchmarks/ is on sys.path when run as a script


def nanoseek_step(model, ids):
    opt = build_optimizer(model, OptimConfig(lr=1e-3))

    def step():
        loss = model.loss(ids, mtp_weight=0.3, balance_alpha=1e-4, indexer_weight=1.0).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(1e-3)

    return step


def hf_step(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["nanoseek", "transformers"], default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, seq = (2, 256) if args.quick else (4, 512)
    reps = args.steps or (2 if args.quick else 4)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    ours = Transformer(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=1.0)
    fpt = training_flops_per_token(ours, seq)
    print(f"small: batch {batch} x {seq}, threads {torch.get_num_threads()}, fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s, {fpt / 1e6:.1f} MFLOP/token")
    res = {}
    if args.only != "transformers":
        dt = median_time(nanoseek_step(ours, ids), 1, reps)
        res["nanoseek"] = batch * seq / dt
        print(f"nanoseek trainer step (V4 objective, Muon+AdamW): {res['nanoseek']:8.1f} tok/s, "
              f"MFU {fpt * batch * seq / dt / peak:.1%}", flush=True)
    if args.only != "nanoseek":
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            print("transformers not installed: baseline skipped")
        else:
            tmp = tempfile.mkdtemp()
            Transformer(config).save_pretrained(tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
            dt = median_time(hf_step(hf, ids), 1, reps)
            res["transformers"] = batch * seq / dt
            print(f"transformers fwd+bwd+AdamW (CE only):            {res['transformers']:8.1f} tok/s, "
                  f"MFU {fpt * batch * seq / dt / peak:.1%}", flush=True)
    if len(res) == 2:
        print(f"ratio nanoseek/transformers: {res['nanoseek'] / res['transformers']:.2f}x (target 2.5x)")


if __name__ == "__main__":
    main()
