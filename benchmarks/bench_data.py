"""Benchmark of the code-data pipeline on the embedded default corpus (stdlib + site-packages).

    python benchmarks/bench_data.py                      # the whole default corpus
    python benchmarks/bench_data.py --max-mb 100         # a deterministic ~100 MB sample

Measures, in one run on this machine:
  * MB/s of source through `data build` + `data tokenize` (wall clock, --workers processes),
    the issue's end-to-end number (tokenizer training is timed separately: it runs on a sample);
  * bytes per token on the val split of the code-aware BPE vs a plain byte-level BPE trained by
    the same library on the same sample with the same vocabulary size (GPT-2's pre-tokenizer);
  * the two speed-ups the pipeline relies on, each against its baseline on the same input:
    one-permutation MinHash vs `datasketch.MinHash.update_batch`, tiktoken vs `tokenizers`.
Results are printed as a table and saved to OUT/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children (the worker pools)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _sample_texts(corpus: Path, mb: float) -> list[str]:
    from nanoseek.data.build import iter_documents

    out, n = [], 0
    for rec in iter_documents(corpus, "train"):
        out.append(rec["content"])
        n += len(rec["content"].encode())
        if n >= mb * 1e6:
            break
    return out


def _minhash_ratio(texts: list[str]) -> dict:
    """Signature throughput: ours vs datasketch.MinHash over the same 5-token shingles."""
    import numpy as np
    from datasketch import MinHash

    from nanoseek.data import dedup

    nbytes = sum(len(t.encode()) for t in texts)
    t0 = time.perf_counter()
    for t in texts:
        dedup.signature(t)
    ours = time.perf_counter() - t0
    shingles = [dedup.ngram_hashes(dedup.token_hashes(t), dedup.SHINGLE, short=True) for t in texts]
    t0 = time.perf_counter()
    for t, sh in zip(texts, shingles):
        dedup.token_hashes(t)          # same tokenisation work on both sides
        m = MinHash(num_perm=dedup.NUM_PERM, hashfunc=lambda x: x, scheme="affine64")
        m.update_batch(sh.tolist())
    base = time.perf_counter() - t0
    del np
    return {"ours_mb_s": nbytes / 1e6 / ours, "datasketch_mb_s": nbytes / 1e6 / base, "speedup": base / ours}


def _encode_ratio(tok_dir: Path, texts: list[str]) -> dict:
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    nbytes = sum(len(t.encode()) for t in texts)
    t0 = time.perf_counter()
    fast = [tok.encode(t) for t in texts]
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [tok.encode_reference(t) for t in texts]
    t_ref = time.perf_counter() - t0
    assert fast == ref, "tiktoken and tokenizers disagree"
    return {"tiktoken_mb_s": nbytes / 1e6 / t_fast, "tokenizers_mb_s": nbytes / 1e6 / t_ref, "speedup": t_ref / t_fast}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-mb", type=float, default=None, help="cap the source read (default: everything)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--max-train-mb", type=float, default=50.0, help="tokenizer training sample")
    ap.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nanoseek-bench-data"))
    args = ap.parse_args(argv)

    from nanoseek.data.build import build_corpus
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, tok_code, tok_plain, shards = out / "corpus", out / "tok-code", out / "tok-plain", out / "shards"
    print(f"bench_data: cpus={os.cpu_count()} workers={args.workers} max_mb={args.max_mb} out={out}", flush=True)

    t0, c0 = time.perf_counter(), _cpu()
    m = build_corpus(corpus, ["default"], workers=args.workers, force=True, progress=False, max_mb=args.max_mb)
    t_build, cpu_build = time.perf_counter() - t0, _cpu() - c0
    src_mb = m["counts"]["bytes_read"] / 1e6
    print(f"build:    {src_mb:,.1f} MB read, {m['counts']['kept_bytes'] / 1e6:,.1f} MB kept, {t_build:.1f} s "
          f"({src_mb / t_build:.2f} MB/s)", flush=True)

    t0 = time.perf_counter()
    meta_code = train_tokenizer(corpus, args.vocab_size, tok_code, max_train_mb=args.max_train_mb, force=True,
                                progress=False)
    t_train = time.perf_counter() - t0
    meta_plain = train_tokenizer(corpus, args.vocab_size, tok_plain, pretokenizer="plain",
                                 max_train_mb=args.max_train_mb, force=True, progress=False)
    print(f"train:    code-aware BPE on {meta_code['trained_on']['bytes'] / 1e6:,.1f} MB in {t_train:.1f} s", flush=True)

    t0, c0 = time.perf_counter(), _cpu()
    idx = tokenize_corpus(corpus, tok_code, shards, workers=args.workers, force=True, progress=False)
    t_tok, cpu_tok = time.perf_counter() - t0, _cpu() - c0
    kept_mb = m["counts"]["kept_bytes"] / 1e6
    print(f"tokenize: {kept_mb:,.1f} MB -> {idx['splits']['train']['tokens'] + idx['splits']['val']['tokens']:,} "
          f"tokens in {t_tok:.1f} s ({kept_mb / t_tok:.2f} MB/s)", flush=True)

    texts = _sample_texts(corpus, 5.0)
    mh = _minhash_ratio(texts)
    enc = _encode_ratio(tok_code, texts)

    bpt_code, bpt_plain = meta_code["val"]["bytes_per_token"], meta_plain["val"]["bytes_per_token"]
    results = {
        "machine": {"cpus": os.cpu_count(), "workers": args.workers, "python": sys.version.split()[0]},
        "source_mb": round(src_mb, 2), "kept_mb": round(kept_mb, 2),
        "build_s": round(t_build, 2), "tokenize_s": round(t_tok, 2), "train_tokenizer_s": round(t_train, 2),
        "end_to_end_mb_s": round(src_mb / (t_build + t_tok), 2),
        "build_mb_s": round(src_mb / t_build, 2), "tokenize_mb_s": round(kept_mb / t_tok, 2),
        # Contention-free view: source MB per CPU-second of the whole job (main + workers); on an
        # otherwise idle machine the wall-clock rate approaches workers x this.
        "build_mb_per_cpu_s": round(src_mb / cpu_build, 2), "tokenize_mb_per_cpu_s": round(kept_mb / cpu_tok, 2),
        "end_to_end_mb_per_cpu_s": round(src_mb / (cpu_build + cpu_tok), 2),
        "load_average": os.getloadavg(),
        "bytes_per_token": {"code": bpt_code, "plain": bpt_plain, "ratio": round(bpt_code / bpt_plain, 4)},
        "minhash": {k: round(v, 2) for k, v in mh.items()},
        "encode": {k: round(v, 2) for k, v in enc.items()},
        "dropped": {k: v["files"] for k, v in m["dropped"].items()},
    }
    print()
    print("| metric | value |")
    print("|---|---:|")
    print(f"| source read (build) | {src_mb:,.1f} MB |")
    print(f"| build + tokenize, end to end | **{results['end_to_end_mb_s']} MB/s** (target 20) |")
    print(f"| build alone | {results['build_mb_s']} MB/s of source ({results['build_mb_per_cpu_s']} MB per CPU-s) |")
    print(f"| tokenize alone | {results['tokenize_mb_s']} MB/s of kept text ({results['tokenize_mb_per_cpu_s']} MB per CPU-s) |")
    print(f"| end to end per CPU-second | {results['end_to_end_mb_per_cpu_s']} MB (x{args.workers} cores = "
          f"{results['end_to_end_mb_per_cpu_s'] * args.workers:.1f} MB/s if the cores were idle) |")
    print(f"| load average (1/5/15 min) during the run | {' / '.join(f'{x:.1f}' for x in results['load_average'])} |")
    print(f"| bytes/token, code-aware BPE (val) | {bpt_code} |")
    print(f"| bytes/token, plain byte-level BPE (val) | {bpt_plain} |")
    print(f"| code-aware / plain | {results['bytes_per_token']['ratio']}x |")
    print(f"| MinHash signatures: ours / datasketch | {mh['ours_mb_s']:.1f} / {mh['datasketch_mb_s']:.1f} MB/s "
          f"= {mh['speedup']:.1f}x |")
    print(f"| encode: tiktoken / tokenizers (1 thread) | {enc['tiktoken_mb_s']:.1f} / {enc['tokenizers_mb_s']:.1f} MB/s "
          f"= {enc['speedup']:.1f}x |")
    (out / "bench_data.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {out / 'bench_data.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
