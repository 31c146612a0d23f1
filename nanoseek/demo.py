"""`nanoseek demo`: the current main job — build a model, run it, save it, reload it, decode.

A short end-to-end check of the model core on a fresh machine (seconds on 2 CPU cores):
builds the `tiny` preset (or `--preset`), runs a forward pass and the training loss, saves the
checkpoint in the official DeepSeek-V4 format, reloads it, verifies the logits are identical,
and compares cached decoding with the uncached forward. Later stages (`nanoseek speedrun`)
replace it as the main job.

    nanoseek demo [--preset tiny] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import time

import torch

from .config import PRESETS, ModelConfig
from .model import Transformer


def run_demo(preset: str = "tiny", out: str = "runs/demo", seq: int = 96, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset)
    model = Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, seq))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    fwd = time.perf_counter() - t0
    terms = model.loss(ids)
    model.save_pretrained(out)
    reloaded = Transformer.from_pretrained(out).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(ids), logits)
        cache = reloaded.new_cache(2, seq)
        prefill = seq // 2
        steps = [reloaded(ids[:, :prefill], cache=cache)]
        for t in range(prefill, seq):
            steps.append(reloaded(ids[:, t : t + 1], cache=cache))
        decode_diff = (torch.cat(steps, 1) - logits).abs().max().item()
    return {
        "preset": preset, "params": sum(p.numel() for p in model.parameters()), "forward_s": fwd,
        "ce": terms.ce.item(), "mtp": terms.mtp.item(), "balance": terms.balance.item(),
        "indexer_kl": terms.indexer.item(), "reload_identical": same, "decode_max_abs_diff": decode_diff,
        "cache_bytes": cache.nbytes(), "out": out,
    }


def _cli(args: argparse.Namespace) -> int:
    r = run_demo(args.preset, args.out)
    print(f"built {r['preset']} model: {r['params']:,} parameters; forward of 2x96 tokens in {r['forward_s']*1e3:.1f} ms")
    print(f"loss terms: ce {r['ce']:.3f}  mtp {r['mtp']:.3f}  balance {r['balance']:.3f}  indexer-KL {r['indexer_kl']:.4f}")
    print(f"saved to {r['out']} (safetensors + config.json, official DeepSeek-V4 names); "
          f"reloaded logits identical: {r['reload_identical']}")
    print(f"cached decode vs full forward: max |diff| {r['decode_max_abs_diff']:.2e} "
          f"(cache {r['cache_bytes'] / 1024:.1f} KiB for 2 sequences)")
    ok = r["reload_identical"] and r["decode_max_abs_diff"] < 1e-4
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


def add_subcommands(sub) -> None:
    p = sub.add_parser("demo", help="build, run, save and reload a model (quick end-to-end check)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=_cli)
