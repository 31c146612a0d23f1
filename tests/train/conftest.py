"""Session fixtures for the trainer tests: a small synthetic Python corpus run through the real
data pipeline (build -> tokenizer -> shards) once."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(args: list[str], cwd: Path, port: int, *, timeout: int = 300, **env: str):
    """`torchrun --nproc-per-node 2 -m nanoseek.cli ARGS` with one thread per rank (extra
    environment variables from **env); asserts that it succeeded and returns the process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "nanoseek.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    # (on failure: whether the ranks got to their end -- stdout -- and both ends of stderr, where a
    # rank's own traceback precedes torchrun's summary)
    assert r.returncode == 0, (f"exit {r.returncode}\n--- stdout (end)\n{r.stdout[-1500:]}\n--- stderr (start)\n"
                               f"{r.stderr[:2000]}\n--- stderr (end)\n{r.stderr[-3000:]}")
    return r


# Layer 0's attention mixer reads n copies of the embedding: its comb (a doubly stochastic mix
# of identical streams is the identity) and its pre weights (the block input's overall scale,
# which the attention's RMSNorm removes) do not change the output, so their gradients are
# rounding noise -- which AdamW, dividing by the noise's own size, turns into steps of +-lr
# whose signs differ between a run and the same run split over ranks (measured: 0.013 in one
# comb entry after 3 steps, everything else within 5e-5).
NO_EFFECT = ("layers.0.hc_attn.base", "layers.0.hc_attn.scale")


def assert_same_model(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Two exported models hold the same weights to `tol` (but for NO_EFFECT) and compute the
    same function, those parameters included (log-probabilities to 10 x tol)."""
    import torch

    from nanoseek import Transformer
    from nanoseek.train.checkpoint import load_model_state

    sa, sb = load_model_state(a), load_model_state(b)
    assert sa.keys() == sb.keys()
    diffs = {k: float((sa[k] - sb[k]).abs().max()) for k in sa if k not in NO_EFFECT}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < tol, (worst, diffs[worst])
    ma, mb = Transformer.from_pretrained(a).eval(), Transformer.from_pretrained(b).eval()
    ids = torch.randint(0, ma.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = torch.log_softmax(ma(ids), -1), torch.log_softmax(mb(ids), -1)
    assert float((la - lb).abs().max()) < 10 * tol


def _module(rng: random.Random, i: int) -> str:
    """Repetitive but not trivial Python, so a tiny model can learn something in a few steps."""
    names = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "items", "result", "index"]
    out = [f'"""Helpers number {i}."""', "", "import math", ""]
    for _ in range(6):
        f, a, b = rng.sample(names, 3)
        op = rng.choice(["+", "-", "*"])
        out += [f"def {f}_{rng.randint(0, 99)}({a}, {b}):",
                f'    """Return {a} {op} {b}."""',
                f"    {a} = {a} {op} {b}",
                f"    for {b} in range({rng.randint(2, 9)}):",
                f"        {a} += {b}",
                f"    return {a}", ""]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """(shard_dir, tokenizer_dir) of a ~150 KB corpus with a val split."""
    from nanoseek.data.build import build_corpus
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("train_data")
    src = root / "src"
    rng = random.Random(0)
    for p in range(12):
        pkg = src / f"pkg{p}"
        pkg.mkdir(parents=True)
        (pkg / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, to any person\n")
        for m in range(8):
            (pkg / f"mod{m}.py").write_text(_module(rng, p * 100 + m))
    corpus = root / "corpus"
    build_corpus(corpus, [str(src)], workers=1, progress=False, decontaminate=False, near_dedup=False, license_policy="any",
                 val_fraction=0.15, num_buckets=8, seed=0)
    tok = root / "tokenizer"
    train_tokenizer(corpus, 512, tok, progress=False)
    shards = root / "shards"
    tokenize_corpus(corpus, tok, shards, workers=1, progress=False)
    return Path(shards), Path(tok)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a shared 2-core
    machine OpenMP's spinning threads make steps 10-50x slower under contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
